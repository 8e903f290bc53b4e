pub mod encode;
pub mod info;
