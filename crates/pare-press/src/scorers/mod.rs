//! One file per scorer press. Names, defaults and scoring follow NVIDIA kvpress.

pub mod compactor;
pub mod cur;
pub mod duo_attention;
pub mod expected_attention;
pub mod keydiff;
pub mod knorm;
pub mod lagkv;
pub mod observed_attention;
pub mod random;
pub mod snapkv;
pub mod streaming;
pub mod tova;

pub use compactor::Compactor;
pub use cur::Cur;
pub use expected_attention::ExpectedAttention;
pub use keydiff::KeyDiff;
pub use knorm::Knorm;
pub use lagkv::LagKv;
pub use observed_attention::ObservedAttention;
pub use random::Random;
pub use snapkv::SnapKv;
pub use streaming::StreamingScorer;
pub use tova::Tova;
