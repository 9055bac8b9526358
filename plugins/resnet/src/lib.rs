//! ResNet encoders (resnet18, resnet34, resnet50) with torchvision's parameter names.

mod resnet;

pub use resnet::{ResNet, ResNetConfig};
