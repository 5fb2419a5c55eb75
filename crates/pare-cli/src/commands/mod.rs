pub mod bench;
pub mod convert;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod score;
