//! Linear resizing of volumes `[D, H, W]`, separably: one linear interpolation pass per
//! axis.
//!
//! The result is libtorch's `upsample_trilinear3d` with `align_corners = false` (the
//! half-pixel convention of PyTorch's `interpolate(mode="trilinear")`), up to float
//! rounding: trilinear interpolation is the tensor product of three 1D interpolations, so
//! it can be done one axis at a time. On the CPU libtorch evaluates all eight taps of every
//! output voxel with strided index arithmetic; three contiguous passes do about a third of
//! the multiplications and vectorise, and were the largest single cost of the volume
//! loader (`medssl bench loader`, perf: 17% in libtorch's kernel).

use tch::{Kind, Tensor};

/// One output position of a 1D linear resize: the two source indices and their weights.
#[derive(Debug, Clone, Copy)]
struct Tap {
    lower: usize,
    upper: usize,
    lower_weight: f32,
    upper_weight: f32,
}

/// The taps of a resize from `input` to `output` samples, exactly as libtorch computes
/// them for `align_corners = false` without explicit scales (float arithmetic):
/// source = (destination + 0.5) * input / output - 0.5, clamped at 0.
fn taps(input: usize, output: usize) -> Vec<Tap> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|destination| {
            let source = (scale * (destination as f32 + 0.5) - 0.5).max(0.0);
            let lower = (source.floor() as usize).min(input - 1);
            let upper_weight = (source - lower as f32).clamp(0.0, 1.0);
            Tap {
                lower,
                upper: if lower < input - 1 { lower + 1 } else { lower },
                lower_weight: 1.0 - upper_weight,
                upper_weight,
            }
        })
        .collect()
}

/// Resizes the middle axis of `data`, read as `[outer, length, inner]`, to `output`; an
/// axis already of that length is returned as it is.
fn resize_axis(data: Vec<f32>, outer: usize, length: usize, inner: usize, output: usize) -> Vec<f32> {
    if length == output {
        return data;
    }
    let taps = taps(length, output);
    // A failed allocation would abort the process without a word; as a panic it reaches the
    // binary's hook, which reports it as running out of memory, naming what to lower.
    let len = outer * output * inner;
    let mut out = Vec::new();
    if out.try_reserve_exact(len).is_err() {
        panic!(
            "can't allocate memory: resizing to {output} along an axis needs {} bytes",
            len.saturating_mul(4)
        );
    }
    out.resize(len, 0.0f32);
    for o in 0..outer {
        let source = &data[o * length * inner..(o + 1) * length * inner];
        let target = &mut out[o * output * inner..(o + 1) * output * inner];
        if inner == 1 {
            for (value, tap) in target.iter_mut().zip(&taps) {
                *value = source[tap.lower] * tap.lower_weight + source[tap.upper] * tap.upper_weight;
            }
        } else {
            for (row, tap) in target.chunks_exact_mut(inner).zip(&taps) {
                let lower = &source[tap.lower * inner..(tap.lower + 1) * inner];
                let upper = &source[tap.upper * inner..(tap.upper + 1) * inner];
                for ((value, &a), &b) in row.iter_mut().zip(lower).zip(upper) {
                    *value = a * tap.lower_weight + b * tap.upper_weight;
                }
            }
        }
    }
    out
}

/// `volume` `[D, H, W]` (any numeric kind) resized to `size` by linear interpolation along
/// each axis, as float32 on the CPU. An axis already of its target length is left as it is,
/// so `[D, H, W] -> [D, S, S]` is bilinear resizing of every slice.
pub fn resize_linear(volume: &Tensor, size: [i64; 3]) -> Tensor {
    let shape = volume.size();
    assert_eq!(shape.len(), 3, "resize_linear expects [D, H, W], got {shape:?}");
    assert!(
        shape.iter().chain(&size).all(|&n| n > 0),
        "resize_linear: empty shape {shape:?} -> {size:?}"
    );
    let device = volume.device();
    let data = Vec::<f32>::try_from(volume.to_kind(Kind::Float).contiguous().flatten(0, -1))
        .expect("a float32 CPU tensor converts to Vec<f32>");
    let [d, h, w] = [shape[0] as usize, shape[1] as usize, shape[2] as usize];
    let [t, s, r] = [size[0] as usize, size[1] as usize, size[2] as usize];
    // Shrinking axes first would be cheaper still; the views mostly enlarge all three, so a
    // fixed order keeps the rounding of every call the same.
    let data = resize_axis(data, d * h, w, 1, r);
    let data = resize_axis(data, d, h, r, s);
    let data = resize_axis(data, 1, d, s * r, t);
    Tensor::from_slice(&data).view(size).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn libtorch_trilinear(volume: &Tensor, size: [i64; 3]) -> Tensor {
        let s = volume.size();
        volume
            .view([1, 1, s[0], s[1], s[2]])
            .upsample_trilinear3d(size, false, None, None, None)
            .view(size)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn separable_resize_equals_libtorch_trilinear(
            d in 1i64..9, h in 1i64..12, w in 1i64..12,
            t in 1i64..12, s in 1i64..14, r in 1i64..14,
            seed in 0i64..1000,
        ) {
            tch::manual_seed(seed);
            let volume = Tensor::randn([d, h, w], (Kind::Float, tch::Device::Cpu));
            let ours = resize_linear(&volume, [t, s, r]);
            let reference = libtorch_trilinear(&volume, [t, s, r]);
            prop_assert_eq!(ours.size(), vec![t, s, r]);
            let error = (&ours - &reference).abs().max().double_value(&[]);
            prop_assert!(error < 1e-5, "max |ours - libtorch| = {error}");
        }
    }

    #[test]
    fn same_size_is_the_identity_and_integer_kinds_are_accepted() {
        let volume = Tensor::arange(60, (Kind::Int16, tch::Device::Cpu)).view([3, 4, 5]);
        let same = resize_linear(&volume, [3, 4, 5]);
        assert_eq!(same.kind(), Kind::Float);
        assert!(same.equal(&volume.to_kind(Kind::Float)));
        // Doubling along W with half-pixel centres: 0, 0.25, 0.75, 1.25, ... clamped at the ends.
        let row = resize_linear(&Tensor::from_slice(&[0.0f32, 1.0, 2.0]).view([1, 1, 3]), [1, 1, 6]);
        let values = Vec::<f32>::try_from(row.flatten(0, -1)).unwrap();
        assert_eq!(values, vec![0.0, 0.25, 0.75, 1.25, 1.75, 2.0]);
    }
}
