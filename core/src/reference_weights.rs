//! The deterministic weights and inputs with which medssl's tests compare a module's forward
//! pass against numbers printed by a PyTorch reference run (MONAI's ViT, UNETR, SwinUNETR;
//! scripts/swin3d_monai_reference.py is one such script). Random initialisation cannot be
//! shared across the two libraries, so both sides set every weight from its name and position
//! alone, and the comparison tests the architecture and its numerics, not only the names.

use tch::{nn, Device, Kind, Tensor};

/// Sets every floating-point variable of `vs` to `0.1 sin(0.7 j + 0.3 phase)` over its flat
/// index `j`, with `phase` the byte sum of its name modulo 97, plus 1 for a norm's weight (a
/// variable `*.norm*.weight`, so that the norms scale by about 1). The name is taken without
/// the first of `prefixes` it starts with (`"encoder."`, `"head."`: medssl's model roots,
/// which the reference model's names lack). Integer buffers (index tables) keep their values.
pub fn fill_from_names(vs: &nn::VarStore, prefixes: &[&str]) {
    tch::no_grad(|| {
        for (name, var) in vs.variables() {
            if !var.is_floating_point() {
                continue;
            }
            let local = prefixes.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(&name);
            let phase = local.bytes().map(u64::from).sum::<u64>() % 97;
            let j = Tensor::arange(var.numel() as i64, (Kind::Double, Device::Cpu));
            let mut value = (j * 0.7 + 0.3 * phase as f64).sin() * 0.1;
            let parts: Vec<&str> = local.split('.').collect();
            if parts.len() >= 2 && parts[parts.len() - 2].contains("norm") && local.ends_with(".weight") {
                value += 1.0;
            }
            var.shallow_clone()
                .copy_(&value.reshape(var.size()).to_kind(var.kind()));
        }
    });
}

/// `2 sin(0.01 j)` over the flat index `j`, in `shape`, as `kind`: an input the reference
/// scripts build the same way.
pub fn smooth_input(shape: &[i64], kind: Kind) -> Tensor {
    let j = Tensor::arange(shape.iter().product::<i64>(), (Kind::Double, Device::Cpu));
    ((j * 0.01).sin() * 2.0).reshape(shape).to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_the_name_without_its_root_and_norms_scale_by_about_one() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let conv = (&root / "head" / "block").var("weight", &[3], nn::Init::Const(0.0));
        let norm = (&root / "encoder" / "norm1").var("weight", &[2], nn::Init::Const(0.0));
        let outside = (&root / "other").var("bias", &[1], nn::Init::Const(0.0));
        fill_from_names(&vs, &["encoder.", "head."]);
        let phase = |name: &str| (name.bytes().map(u64::from).sum::<u64>() % 97) as f64;
        for j in 0..3 {
            let expected = (0.7 * j as f64 + 0.3 * phase("block.weight")).sin() * 0.1;
            assert!((conv.double_value(&[j]) - expected).abs() < 1e-7);
        }
        let expected = 1.0 + (0.3 * phase("norm1.weight")).sin() * 0.1;
        assert!((norm.double_value(&[0]) - expected).abs() < 1e-7);
        let expected = (0.3 * phase("other.bias")).sin() * 0.1;
        assert!((outside.double_value(&[0]) - expected).abs() < 1e-7);
        assert_eq!(smooth_input(&[2, 3], Kind::Float).size(), [2, 3]);
        let x = smooth_input(&[4], Kind::Double);
        assert!((x.double_value(&[3]) - 2.0 * 0.03f64.sin()).abs() < 1e-15);
    }
}
