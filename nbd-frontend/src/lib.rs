pub mod exports;
pub mod nbd;
