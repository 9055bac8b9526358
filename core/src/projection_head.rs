//! The projection head of the contrastive and clustering objectives: blocks of
//! Linear-BatchNorm-ReLU, then a last Linear layer. SimCLR's head g (Chen et al., ICML 2020,
//! Sec. 2.1; with batch norm as in SimCLR v2 and solo-learn), SwAV's and DeepCluster-v2's
//! `projection_head` (Caron et al., NeurIPS 2020, `resnet50.py`) and VICReg's expander (Bardes
//! et al., ICLR 2022, Sec. 4.2: two hidden blocks) are all this one module, as lightly's
//! shared `ProjectionHead` (`lightly/models/modules/heads.py`) builds them.
//!
//! Its variables are named as in a `torch.nn.Sequential` of those layers (`0` the first linear
//! layer, `1` its batch norm, `2` the ReLU without variables, `3` the next linear layer, ...),
//! so weights move to and from the reference implementations by name, and every layer is
//! initialised as PyTorch does ([`crate::layers`]), in the order of the layers.

use crate::layers;
use std::borrow::Borrow;
use tch::nn;

/// A projection head through `widths` (`[input, hidden.., output]`, at least two): a
/// Linear-BN-ReLU block into each hidden width, then a linear layer into the output width.
pub fn projection_head<'a>(p: impl Borrow<nn::Path<'a>>, widths: &[i64]) -> nn::SequentialT {
    build(p.borrow(), widths, true)
}

/// [`projection_head`] whose first linear layer has no bias, which the batch norm after it
/// would cancel anyway (DeepCluster-v2's reference head).
pub fn projection_head_without_first_bias<'a>(p: impl Borrow<nn::Path<'a>>, widths: &[i64]) -> nn::SequentialT {
    build(p.borrow(), widths, false)
}

/// VoCo's `projection_head` (Wu et al., CVPR 2024; Luffy03/Large-Scale-Medical,
/// `Self-supervised/models/voco_head.py`): the blocks of [`projection_head`] with a batch
/// norm that has neither scale and shift nor running statistics (`BatchNorm1d(affine=False,
/// track_running_stats=False)`), so every batch, in training and in evaluation alike, is
/// normalised by its own mean and biased variance (eps 1e-5), on each process alone. Each
/// block is a `Sequential` of its own there, so the linear layers are named `layer1.0`,
/// `layer2.0`, ... as in that module.
pub fn projection_head_with_batch_statistics<'a>(p: impl Borrow<nn::Path<'a>>, widths: &[i64]) -> nn::SequentialT {
    let p = p.borrow();
    assert!(
        widths.len() >= 2,
        "a projection head needs an input and an output width, got {widths:?}"
    );
    let last = widths.len() - 2;
    let mut head = nn::seq_t();
    for (i, pair) in widths.windows(2).enumerate() {
        head = head.add(layers::linear(p / format!("layer{}", i + 1) / 0, pair[0], pair[1]));
        if i < last {
            head = head.add_fn(|x| batch_statistics(x).relu());
        }
    }
    head
}

/// `x` `[N, C]` normalised per channel by the batch's mean and biased variance.
fn batch_statistics(x: &tch::Tensor) -> tch::Tensor {
    x.batch_norm(None::<&tch::Tensor>, None, None, None, true, 0.1, 1e-5, false)
}

fn build(p: &nn::Path, widths: &[i64], first_bias: bool) -> nn::SequentialT {
    assert!(
        widths.len() >= 2,
        "a projection head needs an input and an output width, got {widths:?}"
    );
    let last = widths.len() - 2;
    let mut head = nn::seq_t();
    for (i, pair) in widths.windows(2).enumerate() {
        let (index, (in_dim, out_dim)) = (3 * i, (pair[0], pair[1]));
        let path = p / index;
        head = if i == 0 && !first_bias {
            head.add(layers::linear_without_bias(path, in_dim, out_dim))
        } else {
            head.add(layers::linear(path, in_dim, out_dim))
        };
        if i < last {
            head = head
                .add(layers::batch_norm1d(p / (index + 1), out_dim))
                .add_fn(|x| x.relu());
        }
    }
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::ModuleT;
    use tch::{Device, Kind, Tensor};

    fn sorted_shapes(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
        let mut vars: Vec<_> = vs.variables().into_iter().map(|(k, v)| (k, v.size())).collect();
        vars.sort();
        vars
    }

    /// The head the objectives wrote by hand before this module, for the same widths.
    fn by_hand(p: &nn::Path, widths: [i64; 4], first_bias: bool) -> nn::SequentialT {
        let [input, hidden, second, output] = widths;
        let first = if first_bias {
            layers::linear(p / "0", input, hidden)
        } else {
            layers::linear_without_bias(p / "0", input, hidden)
        };
        nn::seq_t()
            .add(first)
            .add(layers::batch_norm1d(p / "1", hidden))
            .add_fn(|x| x.relu())
            .add(layers::linear(p / "3", hidden, second))
            .add(layers::batch_norm1d(p / "4", second))
            .add_fn(|x| x.relu())
            .add(layers::linear(p / "6", second, output))
    }

    /// Held by the tests here that draw from libtorch's global generator: the one that
    /// reseeds it needs the draws between its seeds to be its own.
    static GLOBAL_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn names_shapes_draws_and_forward_match_the_sequential_written_out() {
        let _generator = GLOBAL_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        for first_bias in [true, false] {
            let widths = [6, 8, 5, 3];
            tch::manual_seed(4);
            let vs = nn::VarStore::new(Device::Cpu);
            let head = if first_bias {
                projection_head(vs.root() / "projector", &widths)
            } else {
                projection_head_without_first_bias(vs.root() / "projector", &widths)
            };
            tch::manual_seed(4);
            let want_vs = nn::VarStore::new(Device::Cpu);
            let want = by_hand(&(want_vs.root() / "projector"), widths, first_bias);

            assert_eq!(sorted_shapes(&vs), sorted_shapes(&want_vs));
            let want_vars = want_vs.variables();
            for (name, t) in vs.variables() {
                assert!(t.equal(&want_vars[&name]), "{name}");
            }
            let names: Vec<String> = sorted_shapes(&vs).into_iter().map(|(n, _)| n).collect();
            assert_eq!(names.contains(&"projector.0.bias".to_string()), first_bias);
            assert!(names.contains(&"projector.4.running_var".to_string()));
            assert!(names.contains(&"projector.6.weight".to_string()));

            let x = Tensor::randn([10, 6], (Kind::Float, Device::Cpu));
            for train in [true, false] {
                assert!(head.forward_t(&x, train).equal(&want.forward_t(&x, train)));
            }
        }
    }

    #[test]
    fn the_batch_statistics_head_is_named_as_vocos_and_normalises_each_batch_alone() {
        let _generator = GLOBAL_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        let mut vs = nn::VarStore::new(Device::Cpu);
        let head = projection_head_with_batch_statistics(vs.root() / "student", &[6, 8, 8, 3]);
        let names: Vec<String> = sorted_shapes(&vs).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "student.layer1.0.bias",
                "student.layer1.0.weight",
                "student.layer2.0.bias",
                "student.layer2.0.weight",
                "student.layer3.0.bias",
                "student.layer3.0.weight",
            ]
        );
        let x = Tensor::randn([10, 6], (Kind::Double, Device::Cpu)) * 3.0 + 1.0;
        let vars = vs.variables();
        let linear = |x: &Tensor, n: usize| {
            x.matmul(&vars[&format!("student.layer{n}.0.weight")].to_kind(Kind::Double).tr())
                + vars[&format!("student.layer{n}.0.bias")].to_kind(Kind::Double)
        };
        let norm = |x: Tensor| {
            let mean = x.mean_dim(0, true, Kind::Double);
            let var = x.var_dim(0, false, true);
            ((x - mean) / (var + 1e-5).sqrt()).relu()
        };
        let want = linear(&norm(linear(&norm(linear(&x, 1)), 2)), 3);
        vs.double();
        for train in [true, false] {
            let got = head.forward_t(&x, train);
            let off = (&got - &want).abs().max().double_value(&[]);
            assert!(off < 1e-9, "train {train}: off by {off}");
        }
    }

    #[test]
    fn one_hidden_block_is_linear_bn_relu_linear() {
        let vs = nn::VarStore::new(Device::Cpu);
        let head = projection_head(vs.root() / "projector", &[4, 16, 2]);
        let names: Vec<String> = sorted_shapes(&vs).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "projector.0.bias",
                "projector.0.weight",
                "projector.1.bias",
                "projector.1.running_mean",
                "projector.1.running_var",
                "projector.1.weight",
                "projector.3.bias",
                "projector.3.weight",
            ]
        );
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        assert_eq!(head.forward_t(&x, true).size(), [5, 2]);
        // Without hidden widths it is one linear layer.
        let single = projection_head(vs.root() / "single", &[4, 2]);
        assert_eq!(single.forward_t(&x, false).size(), [5, 2]);
        assert_eq!(vs.variables().keys().filter(|k| k.starts_with("single.")).count(), 2);
    }
}
