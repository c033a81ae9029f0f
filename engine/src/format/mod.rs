//! On-disk encoding. (meta helper)
