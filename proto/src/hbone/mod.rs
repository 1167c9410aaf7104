//! HBONE
