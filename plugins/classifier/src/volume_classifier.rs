//! The 3D classification head of the paper's volume downstream task: f_intra embeds every
//! slice, f_inter aggregates the slices into one volume embedding (Eq. 10), and "two FC
//! layers" classify it (Nguyen et al., AAAI 2023, Sec. 4):
//!
//! logits = W2 · dropout(ReLU(W1 · v + b1)) + b2,   v = the volume embedding `[B, volume_dim]`,
//!
//! trained with cross-entropy against the volume's class id.
//!
//! The paper does not give the hidden width. The default of 256 is narrower than every
//! volume embedding the paper-scale aggregators produce (256 to 2048 wide), so the head,
//! trained from scratch, stays small beside 3D labelled sets of a few hundred to a thousand
//! volumes (AdrenalMNIST3D: 1188 for training), and it is the hidden width of the common
//! MLP probe. Dropout is off by default, as the paper mentions none.

use medssl_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeClassifierConfig {
    /// Width of the hidden layer between the two FC layers.
    pub hidden_dim: i64,
    /// Probability of zeroing a hidden unit while training, in [0, 1).
    pub dropout: f64,
}

impl Default for VolumeClassifierConfig {
    fn default() -> Self {
        VolumeClassifierConfig {
            hidden_dim: 256,
            dropout: 0.0,
        }
    }
}

pub struct VolumeClassifier {
    fc1: nn::Linear,
    fc2: nn::Linear,
    dropout: f64,
}

impl VolumeClassifier {
    /// The head for the volume embeddings of `shape`; `key` is the config section's dotted
    /// key, for messages.
    pub fn new(p: &nn::Path, cfg: &VolumeClassifierConfig, shape: &HeadShape, key: &str) -> Result<VolumeClassifier> {
        let Some(volume_dim) = shape.volume_dim else {
            bail!(
                "the `volume-classifier` head in `[{key}]` classifies volume embeddings, so it needs an aggregator: \
                 configure an `[aggregator]` section (f_inter), or choose a head for 2D slices"
            );
        };
        ensure!(
            volume_dim >= 1,
            "the `volume-classifier` head needs a volume embedding at least 1 wide, the aggregator gives {volume_dim}"
        );
        ensure!(
            shape.num_classes >= 2,
            "the `volume-classifier` head needs at least 2 classes, the task has {}",
            shape.num_classes
        );
        ensure!(
            cfg.hidden_dim >= 1,
            "config key `{key}.hidden_dim` must be at least 1, found {}",
            cfg.hidden_dim
        );
        ensure!(
            (0.0..1.0).contains(&cfg.dropout),
            "config key `{key}.dropout` must be in [0, 1) (the probability of zeroing a hidden unit), found {}",
            cfg.dropout
        );
        Ok(VolumeClassifier {
            fc1: layers::linear(p / "fc1", volume_dim, cfg.hidden_dim),
            fc2: layers::linear(p / "fc2", cfg.hidden_dim, shape.num_classes),
            dropout: cfg.dropout,
        })
    }
}

impl VolumeClassifier {
    /// Class logits `[B, K]` of volume embeddings `[B, F]`; `train` turns dropout on.
    pub fn logits(&self, volume: &Tensor, train: bool) -> Tensor {
        volume
            .apply(&self.fc1)
            .relu()
            .dropout(self.dropout, train)
            .apply(&self.fc2)
    }

    fn volume<'a>(input: &HeadInput<'a>) -> Result<&'a Tensor> {
        input
            .volume
            .context("head `volume-classifier` needs the volume embeddings, but the batch has none (no aggregator ran)")
    }
}

impl Head for VolumeClassifier {
    fn task(&self) -> Task {
        Task::VolumeClassification
    }

    fn loss(&self, input: &HeadInput, targets: &Targets, _seed: u64) -> Result<Tensor> {
        let targets = targets.classes("volume-classifier")?;
        let logits = self.logits(Self::volume(input)?, true);
        ensure!(
            targets.size() == [logits.size()[0]],
            "head `volume-classifier`: targets of shape {:?} for {} volumes; expected [B] class ids",
            targets.size(),
            logits.size()[0]
        );
        Ok(logits.cross_entropy_for_logits(targets))
    }

    fn predict(&self, input: &HeadInput) -> Result<Prediction> {
        Ok(Prediction::Logits(self.logits(Self::volume(input)?, false)))
    }
}

fn build(section: &Section, p: nn::Path, shape: &HeadShape) -> Result<Box<dyn Head>> {
    let cfg: VolumeClassifierConfig = section.parse()?;
    Ok(Box::new(VolumeClassifier::new(&p, &cfg, shape, &section.key)?))
}

register!(HEADS, VOLUME_CLASSIFIER: HeadEntry = HeadEntry {
    name: "volume-classifier",
    about: "Two FC layers (Linear, ReLU, dropout, Linear) on the aggregator's volume embedding, cross-entropy",
    default_config: default_toml::<VolumeClassifierConfig>,
    // Wide enough that dropout with ReLU cannot silence every hidden unit of a tiny batch.
    smoke_configs: &["hidden_dim = 8", "hidden_dim = 16\ndropout = 0.2"],
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::device::test_device;
    use medssl_core::registry;
    use medssl_mean_pool as _;
    use medssl_resnet as _;
    use tch::nn::OptimizerConfig;

    fn shape(volume_dim: Option<i64>, classes: i64) -> HeadShape {
        HeadShape {
            in_channels: 1,
            spatial_dims: medssl_core::encoder::SpatialDims::Two,
            levels: Vec::new(),
            embedding_dim: 8,
            volume_dim,
            num_classes: classes,
        }
    }

    fn head(vs: &nn::VarStore, body: &str, shape: &HeadShape) -> Result<Box<dyn Head>> {
        let section = Section::inline("head", "volume-classifier", body)?;
        (registry::heads().get("volume-classifier")?.build)(&section, vs.root() / "head", shape)
    }

    fn classifier(vs: &nn::VarStore, body: &str, shape: &HeadShape) -> VolumeClassifier {
        let section = Section::inline("head", "volume-classifier", body).unwrap();
        VolumeClassifier::new(&(vs.root() / "head"), &section.parse().unwrap(), shape, "head").unwrap()
    }

    /// A backbone from the registry: an encoder over every slice, mean pooling over slices.
    struct Backbone {
        encoder: Box<dyn Encoder>,
        aggregator: Box<dyn Aggregator>,
    }

    impl Backbone {
        fn new(vs: &nn::VarStore, encoder: &str, body: &str) -> Backbone {
            let section = Section::inline("encoder", encoder, body).unwrap();
            let encoder = (registry::encoders().get(encoder).unwrap().build)(
                &section,
                vs.root() / "encoder",
                &EncoderShape { in_channels: 1 },
            )
            .unwrap();
            let section = Section::inline("aggregator", "mean-pool", "").unwrap();
            let shape = AggregatorShape {
                input_dim: encoder.embedding_dim(),
                slices: 3,
            };
            let aggregator =
                (registry::aggregators().get("mean-pool").unwrap().build)(&section, vs.root() / "aggregator", &shape)
                    .unwrap();
            Backbone { encoder, aggregator }
        }

        fn head_shape(&self, classes: i64) -> HeadShape {
            HeadShape {
                in_channels: self.encoder.in_channels(),
                spatial_dims: self.encoder.spatial_dims(),
                levels: self.encoder.levels().to_vec(),
                embedding_dim: self.encoder.embedding_dim(),
                volume_dim: Some(self.aggregator.output_dim()),
                num_classes: classes,
            }
        }

        /// The head's input from `volumes` `[B, T, H, W]`, passed to `then`.
        fn with_input<T>(&self, volumes: &Tensor, train: bool, then: impl FnOnce(&HeadInput) -> T) -> T {
            let [b, t, h, w] = volumes.size()[..] else {
                panic!("[B, T, H, W]")
            };
            let features = self.encoder.forward(&volumes.reshape([b * t, 1, h, w]), train);
            let slices = features.pooled.reshape([b, t, -1]);
            let volume = self.aggregator.forward(&slices, None, train).volume;
            then(&HeadInput {
                encoder: &features,
                volume: Some(&volume),
                image_size: [h, w],
                images: None,
            })
        }
    }

    fn volumes(b: i64, h: i64, w: i64) -> Tensor {
        Tensor::randn([b, 3, h, w], (Kind::Float, test_device()))
    }

    #[test]
    fn logits_are_one_row_a_volume_for_several_backbones() {
        tch::manual_seed(0);
        for (encoder, body) in [
            ("resnet18", "base_width = 4\nsmall_input = true"),
            ("resnet18", "base_width = 4\nsmall_input = false"),
            ("resnet50", "base_width = 2"),
        ] {
            let vs = nn::VarStore::new(test_device());
            let backbone = Backbone::new(&vs, encoder, body);
            let shape = backbone.head_shape(4);
            assert_eq!(head(&vs, "", &shape).unwrap().task(), Task::VolumeClassification);
            let head = classifier(
                &nn::VarStore::new(test_device()),
                "hidden_dim = 8\ndropout = 0.2",
                &shape,
            );
            for train in [true, false] {
                let logits = backbone.with_input(&volumes(2, 15, 19), train, |input| {
                    head.logits(input.volume.unwrap(), train)
                });
                assert_eq!(logits.size(), [2, 4], "{encoder} {body}");
            }
        }
    }

    #[test]
    fn gradients_reach_every_head_parameter_and_the_encoder() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(test_device());
        let backbone = Backbone::new(&vs, "resnet18", "base_width = 4\nsmall_input = true");
        let head = head(&vs, "hidden_dim = 8", &backbone.head_shape(3)).unwrap();
        let targets = Targets::Classes(Tensor::from_slice(&[0i64, 2, 1]).to_device(test_device()));
        let loss = backbone
            .with_input(&volumes(3, 12, 12), true, |input| head.loss(input, &targets, 0))
            .unwrap();
        assert!(loss.double_value(&[]).is_finite());
        loss.backward();
        let mut encoder_norm = 0.0;
        // Batch-norm running statistics are buffers, not parameters.
        for (name, var) in vs.variables().into_iter().filter(|(_, v)| v.requires_grad()) {
            let grad = var.grad();
            let norm = if grad.defined() {
                grad.norm().double_value(&[])
            } else {
                0.0
            };
            if name.starts_with("head.") {
                assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
            } else if name.starts_with("encoder.") {
                encoder_norm += norm;
            }
        }
        assert!(encoder_norm > 0.0);
    }

    #[test]
    fn loss_falls_when_overfitting_a_fixed_batch() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(test_device());
        let head = head(&vs, "hidden_dim = 16", &shape(Some(6), 3)).unwrap();
        let volume = Tensor::randn([6, 6], (Kind::Float, test_device()));
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]).to_device(test_device());
        let targets = Targets::Classes(labels.shallow_clone());
        let features = EncoderOutput {
            levels: Vec::new(),
            pooled: Tensor::zeros([6, 8], (Kind::Float, test_device())),
        };
        let input = HeadInput {
            encoder: &features,
            volume: Some(&volume),
            image_size: [1, 1],
            images: None,
        };
        let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        let mut losses = Vec::new();
        for _ in 0..100 {
            let loss = head.loss(&input, &targets, 0).unwrap();
            opt.backward_step(&loss);
            losses.push(loss.double_value(&[]));
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < first * 0.2, "loss went from {first} to {last}");
        let Prediction::Logits(logits) = head.predict(&input).unwrap() else {
            panic!("a classifier predicts logits")
        };
        let predicted = logits.argmax(1, false);
        assert!(predicted.equal(&labels), "{predicted:?}");
    }

    #[test]
    fn dropout_acts_in_training_only() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(test_device());
        let head = classifier(&vs, "hidden_dim = 64\ndropout = 0.5", &shape(Some(6), 2));
        let volume = Tensor::randn([4, 6], (Kind::Float, test_device()));
        let features = EncoderOutput {
            levels: Vec::new(),
            pooled: Tensor::zeros([4, 8], (Kind::Float, test_device())),
        };
        let input = HeadInput {
            encoder: &features,
            volume: Some(&volume),
            image_size: [1, 1],
            images: None,
        };
        let volume = input.volume.unwrap();
        assert!(head.logits(volume, false).equal(&head.logits(volume, false)));
        assert!(!head.logits(volume, true).equal(&head.logits(volume, true)));
    }

    #[test]
    fn config_errors_name_the_key_and_what_was_expected() {
        let message = |body: &str, shape: &HeadShape| {
            let vs = nn::VarStore::new(test_device());
            format!(
                "{:#}",
                head(&vs, body, shape)
                    .err()
                    .unwrap_or_else(|| panic!("`{body}` builds"))
            )
        };
        let no_aggregator = message("", &shape(None, 2));
        assert!(
            no_aggregator.contains("needs an aggregator") && no_aggregator.contains("[head]"),
            "{no_aggregator}"
        );
        for dropout in ["1.0", "-0.1", "nan"] {
            let bad = message(&format!("dropout = {dropout}"), &shape(Some(8), 2));
            assert!(bad.contains("head.dropout") && bad.contains("[0, 1)"), "{bad}");
        }
        let hidden = message("hidden_dim = 0", &shape(Some(8), 2));
        assert!(
            hidden.contains("head.hidden_dim") && hidden.contains("found 0"),
            "{hidden}"
        );
        let classes = message("", &shape(Some(8), 1));
        assert!(classes.contains("at least 2 classes"), "{classes}");
        let typo = message("hiden_dim = 3", &shape(Some(8), 2));
        assert!(typo.contains("hiden_dim"), "{typo}");
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::heads().get("volume-classifier")?;
        let section = Section::inline("head", "volume-classifier", &(entry.default_config)())?;
        assert_eq!(
            section.parse::<VolumeClassifierConfig>()?,
            VolumeClassifierConfig::default()
        );
        Ok(())
    }
}
