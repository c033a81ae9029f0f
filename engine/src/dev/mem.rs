//! `MemDev`: a RAM-backed device. Everything is durable at once; crash
//! behaviour is the simulator's job (`snapmv-sim`'s `SimDev`).

use super::{check_range, BlockDev};
use crate::error::Result;
use crate::sync::{self, RwLock};

/// Pages of 64 KiB, allocated on first write, so a large sparse `MemDev`
/// costs only what is written. Each page has its own lock so threads
/// touching different pages never contend.
const PAGE: u64 = 64 * 1024;

pub struct MemDev {
    size: u64,
    pages: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl MemDev {
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(PAGE) as usize;
        let mut pages = Vec::with_capacity(n);
        pages.resize_with(n, || RwLock::new(None));
        MemDev { size, pages }
    }

    /// Visit the page pieces covering `[offset, offset+len)`.
    fn pieces(offset: u64, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let page = (pos / PAGE) as usize;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(len - done);
            f(page, in_page, done, n);
            done += n;
        }
    }
}

impl BlockDev for MemDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range("memdev read", offset, buf.len() as u64, self.size)?;
        Self::pieces(offset, buf.len(), |page, in_page, done, n| {
            let g = sync::read(&self.pages[page]);
            match g.as_ref() {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
        });
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_range("memdev write", offset, buf.len() as u64, self.size)?;
        Self::pieces(offset, buf.len(), |page, in_page, done, n| {
            let mut g = sync::write(&self.pages[page]);
            let p = g.get_or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[in_page..in_page + n].copy_from_slice(&buf[done..done + n]);
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn name(&self) -> &str {
        "memdev"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_across_pages_and_bounds() {
        let d = MemDev::new(3 * PAGE + 100);
        let data: Vec<u8> = (0..PAGE as usize + 300).map(|i| (i % 251) as u8).collect();
        d.write_at(PAGE - 10, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        d.read_at(PAGE - 10, &mut back).unwrap();
        assert_eq!(back, data);
        let mut z = [1u8; 16];
        d.read_at(3 * PAGE, &mut z).unwrap();
        assert_eq!(z, [0u8; 16], "unwritten space reads as zeros");
        assert!(d.read_at(3 * PAGE + 90, &mut [0u8; 11]).is_err());
        assert!(d.write_at(u64::MAX - 2, &[0u8; 4]).is_err());
    }
}
