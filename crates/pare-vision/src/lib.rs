//! LLaVA-1.5 for pare: a CLIP ViT vision tower, the two-layer GELU projector, CLIP image
//! preprocessing (Pillow-exact resize), and a prefill that puts the projected image features in
//! place of the `<image>` placeholders before pare's own decoder runs.

pub mod clip;
pub mod error;
pub mod llava;
pub mod preprocess;
pub mod projector;

pub use clip::{ClipVision, ClipVisionConfig};
pub use error::{Result, VisionError};
pub use llava::{is_llava_config, is_llava_dir, LlavaConfig, LlavaModel, LoadedLlava};
pub use preprocess::{load_image, ImageProcessor, PixelValues, Rgb8};
pub use projector::Projector;
