//! The geometry of (shifted) window attention over a 3D grid of tokens (Liu et al., "Swin
//! Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021, Sec. 3.2),
//! as MONAI 1.6 computes it (`monai/networks/nets/swin_unetr.py`: `get_window_size`,
//! `window_partition`, `window_reverse`, `compute_mask`, and the `relative_position_index`
//! buffer of `WindowAttention`).
//!
//! Tokens are channels-last, `[N, D, H, W, C]`, as in MONAI's blocks. A window of `[wd, wh, ww]`
//! tokens is flattened in (d, h, w) order, w fastest, and the windows of one volume are
//! ordered the same way, volume outermost: `[N * windows, wd * wh * ww, C]`.

use tch::{Device, Kind, Tensor};

/// The additive attention mask between tokens of different regions of a shifted window:
/// MONAI's (and the Swin paper's) -100, which the softmax turns into a weight of about e^-100.
pub const MASKED: f64 = -100.0;

/// MONAI's `get_window_size`: along an axis whose size is at most the window, the window
/// shrinks to the size and the shift to 0 (the whole axis is one window, nothing to shift).
pub fn window_and_shift(size: [i64; 3], window: [i64; 3], shift: [i64; 3]) -> ([i64; 3], [i64; 3]) {
    let (mut window_used, mut shift_used) = (window, shift);
    for axis in 0..3 {
        if size[axis] <= window[axis] {
            window_used[axis] = size[axis];
            shift_used[axis] = 0;
        }
    }
    (window_used, shift_used)
}

/// `size` rounded up to a multiple of `window` on each axis: the grid the blocks pad to.
pub fn padded(size: [i64; 3], window: [i64; 3]) -> [i64; 3] {
    [0, 1, 2].map(|a| (size[a] + window[a] - 1) / window[a] * window[a])
}

/// `[N, D, H, W, C]` (each spatial size a multiple of `window`) to `[N * windows, tokens, C]`.
pub fn partition(x: &Tensor, window: [i64; 3]) -> Tensor {
    let size = x.size();
    let (n, [d, h, w], c) = (size[0], [size[1], size[2], size[3]], size[4]);
    let [wd, wh, ww] = window;
    x.reshape([n, d / wd, wd, h / wh, wh, w / ww, ww, c])
        .permute([0, 1, 3, 5, 2, 4, 6, 7])
        .reshape([-1, wd * wh * ww, c])
}

/// The inverse of [`partition`]: windows `[N * windows, tokens, C]` back onto the
/// `[N, D, H, W, C]` grid of `grid = [N, D, H, W]`.
pub fn reverse(windows: &Tensor, window: [i64; 3], grid: [i64; 4]) -> Tensor {
    let [n, d, h, w] = grid;
    let [wd, wh, ww] = window;
    windows
        .reshape([n, d / wd, h / wh, w / ww, wd, wh, ww, -1])
        .permute([0, 1, 4, 2, 5, 3, 6, 7])
        .reshape([n, d, h, w, -1])
}

/// The region of each position along one axis of the padded grid after the cyclic shift by
/// `shift`: the last window holds tokens from the grid's start (region 2), its end before the
/// shift (region 1) and the rest (region 0). MONAI labels the regions by assigning the
/// slices `[:-window]`, `[-window:-shift]`, `[-shift:]` in turn; with `shift = 0` the last
/// slice is the whole axis, so the axis is one region.
fn regions(length: i64, window: i64, shift: i64) -> Vec<i64> {
    (0..length)
        .map(|i| match shift {
            0 => 0,
            _ if i < length - window => 0,
            _ if i < length - shift => 1,
            _ => 2,
        })
        .collect()
}

/// MONAI's `compute_mask`: for the shifted windows of a padded grid `[D, H, W]`, the
/// additive mask `[windows, tokens, tokens]` that is 0 between two tokens of the same region
/// and [`MASKED`] between tokens that the cyclic shift brought together from different
/// places, in `kind` on `device`.
pub fn shifted_window_mask(grid: [i64; 3], window: [i64; 3], shift: [i64; 3], kind: Kind, device: Device) -> Tensor {
    let axis = |a: usize, view: [i64; 3]| Tensor::from_slice(&regions(grid[a], window[a], shift[a])).reshape(view);
    // One label a region: the three axes' regions as digits in base 3.
    let labels = axis(0, [-1, 1, 1]) * 9 + axis(1, [1, -1, 1]) * 3 + axis(2, [1, 1, -1]);
    let windows = partition(&labels.reshape([1, grid[0], grid[1], grid[2], 1]), window).squeeze_dim(-1);
    let differs = windows.unsqueeze(1).ne_tensor(&windows.unsqueeze(2));
    differs.to_kind(kind).to_device(device) * MASKED
}

/// `WindowAttention`'s `relative_position_index` for a window of `[wd, wh, ww]` tokens:
/// `[tokens, tokens]` (int64), the row of the relative position bias table that holds the
/// bias between token `i` and token `j`: `(c_i - c_j + window - 1)` on each axis, read as the
/// digits of a number in bases `(2 wd - 1, 2 wh - 1, 2 ww - 1)`.
pub fn relative_position_index(window: [i64; 3], device: Device) -> Tensor {
    let [wd, wh, ww] = window;
    let coords: Vec<[i64; 3]> = (0..wd)
        .flat_map(|d| (0..wh).flat_map(move |h| (0..ww).map(move |w| [d, h, w])))
        .collect();
    let index: Vec<i64> = coords
        .iter()
        .flat_map(|ci| {
            coords.iter().map(move |cj| {
                let [d, h, w] = [0, 1, 2].map(|a| ci[a] - cj[a] + window[a] - 1);
                d * (2 * wh - 1) * (2 * ww - 1) + h * (2 * ww - 1) + w
            })
        })
        .collect();
    let tokens = coords.len() as i64;
    Tensor::from_slice(&index).reshape([tokens, tokens]).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CPU: Device = Device::Cpu;

    /// MONAI's region labelling done literally: every position of the padded grid gets the
    /// counter of the last of the 27 nested slice assignments (`[..-window]`,
    /// `[-window..-shift]`, `[-shift..]` on each axis, Python's slice semantics) that covers it.
    fn brute_force_labels(grid: [i64; 3], window: [i64; 3], shift: [i64; 3]) -> Vec<i64> {
        // Python's `slice(start, stop)` over `0..length`, negative bounds from the end.
        let python = |length: i64, start: Option<i64>, stop: Option<i64>| {
            let at = |b: i64| if b < 0 { (length + b).max(0) } else { b.min(length) };
            (start.map_or(0, at), stop.map_or(length, at))
        };
        let slices = |a: usize| {
            let (l, w, s) = (grid[a], window[a], shift[a]);
            [
                python(l, None, Some(-w)),
                python(l, Some(-w), Some(-s)),
                python(l, Some(-s), None),
            ]
        };
        let (sd, sh, sw) = (slices(0), slices(1), slices(2));
        let mut labels = vec![0; (grid[0] * grid[1] * grid[2]) as usize];
        let mut counter = 0;
        for d in sd {
            for h in sh {
                for w in sw {
                    for i in d.0..d.1 {
                        for j in h.0..h.1 {
                            for k in w.0..w.1 {
                                labels[((i * grid[1] + j) * grid[2] + k) as usize] = counter;
                            }
                        }
                    }
                    counter += 1;
                }
            }
        }
        labels
    }

    /// The mask, element by element, from the brute-force labels and the window layout.
    fn brute_force_mask(grid: [i64; 3], window: [i64; 3], shift: [i64; 3]) -> Vec<Vec<Vec<f64>>> {
        let labels = brute_force_labels(grid, window, shift);
        let mut masks = Vec::new();
        for d0 in (0..grid[0]).step_by(window[0] as usize) {
            for h0 in (0..grid[1]).step_by(window[1] as usize) {
                for w0 in (0..grid[2]).step_by(window[2] as usize) {
                    let mut tokens = Vec::new();
                    for i in 0..window[0] {
                        for j in 0..window[1] {
                            for k in 0..window[2] {
                                let at = ((d0 + i) * grid[1] + h0 + j) * grid[2] + w0 + k;
                                tokens.push(labels[at as usize]);
                            }
                        }
                    }
                    masks.push(
                        tokens
                            .iter()
                            .map(|a| tokens.iter().map(|b| if a == b { 0.0 } else { MASKED }).collect())
                            .collect(),
                    );
                }
            }
        }
        masks
    }

    fn to_nested(mask: &Tensor) -> Vec<Vec<Vec<f64>>> {
        let size = mask.size();
        (0..size[0])
            .map(|w| {
                (0..size[1])
                    .map(|i| (0..size[2]).map(|j| mask.double_value(&[w, i, j])).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_shift_mask_blocks_exactly_the_pairs_from_different_regions() {
        // A grid of 2 x 3 x 2 windows of [3, 2, 4] tokens, shifted by half a window; then
        // one axis unshifted (MONAI's rule for an axis no longer than the window), as a
        // stage whose depth axis fits in one window sees it.
        for (grid, window, shift) in [
            ([6, 6, 8], [3, 2, 4], [1, 1, 2]),
            ([4, 6, 8], [4, 3, 4], [0, 1, 2]),
            ([7, 7, 7], [7, 7, 7], [3, 3, 3]),
        ] {
            let mask = shifted_window_mask(grid, window, shift, Kind::Float, CPU);
            let windows = grid.iter().zip(&window).map(|(g, w)| g / w).product::<i64>();
            let tokens = window.iter().product::<i64>();
            assert_eq!(mask.size(), [windows, tokens, tokens]);
            assert_eq!(
                to_nested(&mask),
                brute_force_mask(grid, window, shift),
                "{grid:?} {window:?} {shift:?}"
            );
        }
        // Unshifted windows that tile the grid need no mask: every pair is allowed.
        let mask = shifted_window_mask([4, 4, 4], [2, 2, 2], [0, 0, 0], Kind::Float, CPU);
        assert_eq!(mask.abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn the_masked_pairs_are_the_windows_that_wrap_around() {
        // Along one shifted axis of 2 windows of 4, shift 2: the first window holds tokens
        // of region 0 only; the last one two regions of 2 tokens each.
        let mask = shifted_window_mask([1, 1, 8], [1, 1, 4], [0, 0, 2], Kind::Float, CPU);
        assert_eq!(mask.get(0).abs().max().double_value(&[]), 0.0);
        let last = mask.get(1);
        for i in 0..4 {
            for j in 0..4 {
                let expected = if (i < 2) == (j < 2) { 0.0 } else { MASKED };
                assert_eq!(last.double_value(&[i, j]), expected, "{i} {j}");
            }
        }
    }

    #[test]
    fn window_sizes_shrink_to_small_axes() {
        assert_eq!(
            window_and_shift([20, 5, 7], [7, 7, 7], [3, 3, 3]),
            ([7, 5, 7], [3, 0, 0])
        );
        assert_eq!(
            window_and_shift([8, 8, 8], [7, 7, 7], [0, 0, 0]),
            ([7, 7, 7], [0, 0, 0])
        );
        assert_eq!(padded([20, 5, 7], [7, 5, 7]), [21, 5, 7]);
    }

    #[test]
    fn the_relative_position_index_reads_coordinate_differences() {
        let window = [2, 3, 4];
        let index = relative_position_index(window, CPU);
        assert_eq!(index.size(), [24, 24]);
        assert_eq!(index.kind(), Kind::Int64);
        // Token 0 is (0, 0, 0), token 23 is (1, 2, 3): differences (-1, -2, -3) and back.
        let bases = [2 * 3 - 1, 2 * 4 - 1];
        let row = |[d, h, w]: [i64; 3]| (d + 1) * bases[0] * bases[1] + (h + 2) * bases[1] + (w + 3);
        assert_eq!(index.int64_value(&[0, 23]), row([-1, -2, -3]));
        assert_eq!(index.int64_value(&[23, 0]), row([1, 2, 3]));
        // The diagonal is the zero offset; the table has (2w - 1)^3 rows, all reached.
        let diagonal = index.diagonal(0, 0, 1);
        assert!(diagonal.equal(&(diagonal.ones_like() * row([0, 0, 0]))));
        let distinct = index.flatten(0, -1).unique_dim(0, true, false, false).0.size()[0];
        assert_eq!(distinct, 3 * 5 * 7);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
        #[test]
        fn reverse_undoes_partition(
            n in 1i64..3, window in prop::array::uniform3(1i64..4), windows in prop::array::uniform3(1i64..3), c in 1i64..4,
        ) {
            let grid = [0, 1, 2].map(|a| window[a] * windows[a]);
            let x = Tensor::randn([n, grid[0], grid[1], grid[2], c], (Kind::Float, CPU));
            let parts = partition(&x, window);
            prop_assert_eq!(parts.size(), vec![n * windows.iter().product::<i64>(), window.iter().product::<i64>(), c]);
            // The first window is the grid's corner block, in (d, h, w) order.
            let corner = x.narrow(1, 0, window[0]).narrow(2, 0, window[1]).narrow(3, 0, window[2]).get(0);
            prop_assert!(parts.get(0).equal(&corner.reshape([-1, c])));
            prop_assert!(reverse(&parts, window, [n, grid[0], grid[1], grid[2]]).equal(&x));
        }
    }
}
