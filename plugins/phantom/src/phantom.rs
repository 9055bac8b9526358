//! Dataset format `phantom`: deterministic synthetic anatomical phantoms, so that demos,
//! tests and benchmarks run where no data is on disk.
//!
//! The layout follows the Shepp-Logan head phantom (Shepp & Logan, "The Fourier
//! reconstruction of a head section", IEEE TNS 1974): a body ellipsoid with a bright rim
//! ("skull") that holds smaller ellipsoids of other intensities. Here every ellipsoid is
//! drawn at random per sample, so the samples differ in content the way scans of different
//! subjects do and self-supervised objectives have real structure to tell apart. On top come
//! the nuisances that real scans carry and that learned features should ignore: a smooth
//! multiplicative bias field (MRI intensity non-uniformity) and Gaussian noise.
//!
//! Sample `i` is a pure function of (`seed`, `i`): its generator is derived with
//! [`medssl_core::rng::generator`], and the noise is drawn from that generator rather than
//! from libtorch's global one, which loader threads share.

use medssl_core::prelude::*;
use medssl_core::rng;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Whether samples are volumes or single images.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Dimensions {
    /// Volumes `[slices, size, size]`.
    #[serde(rename = "3d")]
    Volume,
    /// Images `[1, size, size]`: a section through the body's centre, with every inner
    /// structure centred on it.
    #[serde(rename = "2d")]
    Image,
}

/// Keys of a `[data.sources.NAME]` section with `format = "phantom"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PhantomConfig {
    /// Number of samples (the default gives a contrastive demo six batches of 32).
    pub count: usize,
    /// Slices per volume (D); ignored for `dimensions = "2d"`.
    pub slices: usize,
    /// In-plane side (H = W), in voxels.
    pub size: usize,
    /// Seed of the phantoms, independent of the run seed so that the data stays the same
    /// when only the training seed changes.
    pub seed: u64,
    /// `"3d"` for volumes, `"2d"` for single-slice images `[1, size, size]`.
    pub dimensions: Dimensions,
}

impl Default for PhantomConfig {
    fn default() -> Self {
        PhantomConfig {
            count: 192,
            slices: 24,
            size: 64,
            seed: 0,
            dimensions: Dimensions::Volume,
        }
    }
}

/// Smallest in-plane side: below it the inner structures are a voxel or two wide.
const MIN_SIZE: usize = 8;
/// Largest number of voxels of one sample (4 GiB of float32): a typo like `size = 640000`
/// must be an error, not an allocation failure that aborts the process.
const MAX_VOXELS: usize = 1 << 30;

/// The phantom reader: nothing to list, every sample is generated in `load`.
pub struct Phantom {
    config: PhantomConfig,
    /// Slices of a sample: `slices` for volumes, 1 for images.
    depth: usize,
}

impl Phantom {
    /// Checks the config; `key` is the section's dotted key, for messages.
    pub fn new(config: PhantomConfig, key: &str) -> Result<Phantom> {
        ensure!(
            config.count >= 1,
            "config key `{key}.count` must be at least 1, found {}",
            config.count
        );
        ensure!(
            config.size >= MIN_SIZE,
            "config key `{key}.size` must be at least {MIN_SIZE} voxels, found {}",
            config.size
        );
        let depth = match config.dimensions {
            Dimensions::Volume => config.slices,
            Dimensions::Image => 1,
        };
        ensure!(
            depth >= 1,
            "config key `{key}.slices` must be at least 1, found {}",
            config.slices
        );
        let voxels = depth.checked_mul(config.size).and_then(|v| v.checked_mul(config.size));
        ensure!(
            voxels.is_some_and(|v| v <= MAX_VOXELS),
            "config keys `{key}.slices` = {} and `{key}.size` = {} give a sample of more than {MAX_VOXELS} \
             voxels; expected a smaller phantom",
            config.slices,
            config.size
        );
        Ok(Phantom { config, depth })
    }

    /// Generates sample `index`: float32 `[D, H, W]` in [0, 1] on the CPU.
    fn generate(&self, index: usize) -> Tensor {
        let mut generator = rng::generator(self.config.seed, &[index as u64]);
        let size = self.config.size as i64;
        let grid = Grid::new(self.depth as i64, size);
        // Edge width of the soft masks, in units of an ellipsoid's radius: about a voxel, so
        // boundaries show partial-volume blur rather than aliased staircases.
        let edge = 1.5 / self.config.size as f64;

        let body = Ellipsoid::random_body(&mut generator);
        let rim_thickness = generator.random_range(0.06..0.12);
        let interior = body.shrunk(rim_thickness);
        let tissue = generator.random_range(0.40..0.55);
        let rim = generator.random_range(0.70..0.90);
        let body_mask = body.mask(&grid, edge);
        let interior_mask = interior.mask(&grid, edge);

        let mut image = &body_mask * tissue;
        image = blend(&image, rim, &(&body_mask * (1.0 - &interior_mask)));
        let structures = generator.random_range(2..=6);
        for _ in 0..structures {
            let structure = Structure::random(&mut generator, &interior, self.config.dimensions);
            // Clipped to the interior: organs do not poke through the skull.
            let mask = structure.shape.mask(&grid, edge) * &interior_mask;
            image = blend(&image, structure.intensity, &mask);
        }

        let bias = BiasField::random(&mut generator).evaluate(&grid);
        let noise_std = generator.random_range(0.01..0.03);
        let noise = gaussian_noise(&mut generator, grid.shape) * noise_std;
        (image * bias + noise).clamp(0.0, 1.0)
    }
}

impl Dataset for Phantom {
    fn len(&self) -> usize {
        self.config.count
    }

    fn describe(&self, index: usize) -> String {
        let what = match self.config.dimensions {
            Dimensions::Volume => "volume",
            Dimensions::Image => "image",
        };
        format!("phantom {what} #{index} (seed {})", self.config.seed)
    }

    fn load(&self, index: usize) -> Result<Volume> {
        ensure!(
            index < self.config.count,
            "phantom sample #{index} does not exist: the source has {} samples",
            self.config.count
        );
        Ok(Volume::new(self.generate(index), None))
    }
}

/// Normalised coordinates of the voxels, each axis spanning [-1, 1]. The axes are shaped
/// `[D, 1, 1]`, `[1, H, 1]` and `[1, 1, W]`, so expressions of them broadcast to the volume
/// without materialising three full coordinate grids.
struct Grid {
    z: Tensor,
    y: Tensor,
    x: Tensor,
    shape: [i64; 3],
}

impl Grid {
    fn new(depth: i64, size: i64) -> Grid {
        Grid {
            z: axis_coordinates(depth).view([-1, 1, 1]),
            y: axis_coordinates(size).view([1, -1, 1]),
            x: axis_coordinates(size).view([1, 1, -1]),
            shape: [depth, size, size],
        }
    }
}

const FLOAT_CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

/// `n` points spanning [-1, 1]; a single slice sits at the centre, so a 2D phantom is the
/// central section of a volume one.
fn axis_coordinates(n: i64) -> Tensor {
    if n == 1 {
        Tensor::zeros([1], FLOAT_CPU)
    } else {
        Tensor::linspace(-1.0, 1.0, n, FLOAT_CPU)
    }
}

/// `image` with `value` painted where `mask` is 1, blended where it is fractional.
fn blend(image: &Tensor, value: f64, mask: &Tensor) -> Tensor {
    image * (1.0 - mask) + mask * value
}

/// An ellipsoid in normalised coordinates, rotated in-plane (about the slice axis), since
/// anatomy is rarely aligned with the scanner's axes.
#[derive(Debug, Clone, Copy)]
struct Ellipsoid {
    /// Centre (z, y, x).
    centre: [f64; 3],
    /// Semi-axes (z, y, x).
    radii: [f64; 3],
    /// In-plane rotation, in radians.
    angle: f64,
}

impl Ellipsoid {
    /// The body: nearly filling the field of view, as in a cropped scan.
    fn random_body(generator: &mut ChaCha8Rng) -> Ellipsoid {
        Ellipsoid {
            centre: [
                generator.random_range(-0.05..0.05),
                generator.random_range(-0.05..0.05),
                generator.random_range(-0.05..0.05),
            ],
            radii: [
                generator.random_range(0.80..0.95),
                generator.random_range(0.70..0.90),
                generator.random_range(0.60..0.85),
            ],
            angle: generator.random_range(-0.3..0.3),
        }
    }

    /// The same ellipsoid with every semi-axis reduced by `thickness`.
    fn shrunk(&self, thickness: f64) -> Ellipsoid {
        Ellipsoid {
            radii: self.radii.map(|r| (r - thickness).max(0.05)),
            ..*self
        }
    }

    /// Soft indicator: 1 inside, 0 outside, a sigmoid ramp `edge` radii wide across the
    /// surface.
    fn mask(&self, grid: &Grid, edge: f64) -> Tensor {
        let (sin, cos) = self.angle.sin_cos();
        let dz = &grid.z - self.centre[0];
        let dy = &grid.y - self.centre[1];
        let dx = &grid.x - self.centre[2];
        let along = &dy * cos + &dx * sin;
        let across = &dx * cos - &dy * sin;
        let radius: Tensor =
            ((dz / self.radii[0]).square() + (along / self.radii[1]).square() + (across / self.radii[2]).square())
                .sqrt();
        ((1f64 - radius) / edge).sigmoid()
    }
}

/// An inner structure: an ellipsoid with its own intensity.
struct Structure {
    shape: Ellipsoid,
    intensity: f64,
}

impl Structure {
    /// A bright bone-like, dark cavity-like or soft-tissue structure inside `interior`.
    fn random(generator: &mut ChaCha8Rng, interior: &Ellipsoid, dimensions: Dimensions) -> Structure {
        let intensity = match generator.random_range(0..3) {
            0 => generator.random_range(0.80..0.98),
            1 => generator.random_range(0.02..0.15),
            _ => generator.random_range(0.25..0.65),
        };
        let mut offset = || generator.random_range(-0.55..0.55);
        let mut centre = [
            interior.centre[0] + offset() * interior.radii[0],
            interior.centre[1] + offset() * interior.radii[1],
            interior.centre[2] + offset() * interior.radii[2],
        ];
        if dimensions == Dimensions::Image {
            // The image is the section z = 0: a structure centred there always shows.
            centre[0] = 0.0;
        }
        let radii = [
            generator.random_range(0.15..0.50),
            generator.random_range(0.08..0.30),
            generator.random_range(0.08..0.30),
        ];
        let angle = generator.random_range(-std::f64::consts::PI..std::f64::consts::PI);
        Structure {
            shape: Ellipsoid { centre, radii, angle },
            intensity,
        }
    }
}

/// A smooth multiplicative field `1 + g.(z, y, x) + q (y^2 + x^2)`: a linear gradient plus a
/// radial term, the low-order shape of coil-sensitivity non-uniformity.
struct BiasField {
    gradient: [f64; 3],
    radial: f64,
}

impl BiasField {
    fn random(generator: &mut ChaCha8Rng) -> BiasField {
        let mut coefficient = || generator.random_range(-0.12..0.12);
        BiasField {
            gradient: [coefficient(), coefficient(), coefficient()],
            radial: coefficient(),
        }
    }

    fn evaluate(&self, grid: &Grid) -> Tensor {
        1.0 + &grid.z * self.gradient[0]
            + &grid.y * self.gradient[1]
            + &grid.x * self.gradient[2]
            + (grid.y.square() + grid.x.square()) * self.radial
    }
}

/// Standard normal noise of `shape` from `generator` (Box-Muller), float32 on the CPU.
fn gaussian_noise(generator: &mut ChaCha8Rng, shape: [i64; 3]) -> Tensor {
    let count = shape.iter().product::<i64>().max(0) as usize;
    let mut values = Vec::with_capacity(count + 1);
    while values.len() < count {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u: f64 = 1.0 - generator.random::<f64>();
        let v: f64 = generator.random();
        let radius = (-2.0 * u.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * v).sin_cos();
        values.push((radius * cos) as f32);
        values.push((radius * sin) as f32);
    }
    values.truncate(count);
    Tensor::from_slice(&values).view(shape)
}

fn build(section: &Section) -> Result<Box<dyn Dataset>> {
    let config: PhantomConfig = section.parse()?;
    Ok(Box::new(Phantom::new(config, &section.key)?))
}

register!(DATASETS, PHANTOM: DatasetEntry = DatasetEntry {
    name: "phantom",
    about: "synthetic anatomical phantoms (random ellipsoids, bias field, noise); no data on disk",
    default_config: default_toml::<PhantomConfig>,
    build,
});

#[cfg(test)]
mod tests {
    use super::*;
    use medssl_core::registry;

    fn phantom(body: &str) -> Result<Box<dyn Dataset>> {
        build(&Section::inline("data.sources.x", "phantom", body)?)
    }

    #[test]
    fn default_volume_is_float32_slices_by_size_by_size_on_cpu() -> Result<()> {
        let dataset = phantom("")?;
        assert_eq!(dataset.len(), 192);
        let volume = dataset.load(0)?;
        assert_eq!(volume.voxels.size(), [24, 64, 64]);
        assert_eq!(volume.voxels.kind(), Kind::Float);
        assert_eq!(volume.voxels.device(), Device::Cpu);
        Ok(())
    }

    #[test]
    fn sample_is_a_pure_function_of_seed_and_index() -> Result<()> {
        let dataset = phantom("count = 3\nslices = 6\nsize = 24")?;
        let again = phantom("count = 3\nslices = 6\nsize = 24")?;
        let other_seed = phantom("count = 3\nslices = 6\nsize = 24\nseed = 1")?;
        let first = dataset.load(1)?.voxels;
        // Loading another sample in between must not change what index 1 gives.
        dataset.load(2)?;
        assert!(first.equal(&dataset.load(1)?.voxels));
        assert!(first.equal(&again.load(1)?.voxels));
        assert!(!first.equal(&dataset.load(0)?.voxels));
        assert!(!first.equal(&other_seed.load(1)?.voxels));
        Ok(())
    }

    #[test]
    fn values_are_finite_in_unit_range_with_a_body_on_a_dark_background() -> Result<()> {
        let dataset = phantom("count = 4\nslices = 8\nsize = 32")?;
        for index in 0..dataset.len() {
            let voxels = dataset.load(index)?.voxels;
            assert!(bool::try_from(voxels.isfinite().all())?);
            assert!(voxels.min().double_value(&[]) >= 0.0);
            assert!(voxels.max().double_value(&[]) <= 1.0);
            let corner = voxels.double_value(&[0, 0, 0]);
            assert!(corner < 0.15, "sample {index}: corner {corner} should be background");
            let centre = voxels.double_value(&[4, 16, 16]);
            assert!(
                centre > 0.0,
                "sample {index}: centre {centre} should be inside the body"
            );
            // Rim, tissue and structures: far from a flat image.
            assert!(
                voxels.std(true).double_value(&[]) > 0.1,
                "sample {index} has little contrast"
            );
        }
        Ok(())
    }

    #[test]
    fn two_d_gives_single_slice_images() -> Result<()> {
        let dataset = phantom("dimensions = \"2d\"\nsize = 32\nslices = 10")?;
        assert_eq!(dataset.load(0)?.voxels.size(), [1, 32, 32]);
        assert_eq!(dataset.describe(3), "phantom image #3 (seed 0)");
        Ok(())
    }

    #[test]
    fn describe_names_index_and_seed() -> Result<()> {
        assert_eq!(phantom("seed = 7")?.describe(5), "phantom volume #5 (seed 7)");
        Ok(())
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let error = phantom("countt = 3").err().expect("an unknown key must be rejected");
        let message = format!("{error:#}");
        assert!(message.contains("countt"), "{message}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        for (body, key) in [
            ("dimensions = \"4d\"", "dimensions"),
            ("size = 2", "data.sources.x.size"),
            ("slices = 0", "data.sources.x.slices"),
            ("count = 0", "data.sources.x.count"),
            ("size = 1000000", "data.sources.x.size"),
        ] {
            let error = phantom(body)
                .err()
                .unwrap_or_else(|| panic!("`{body}` must be rejected"));
            let message = format!("{error:#}");
            assert!(message.contains(key), "`{body}`: {message}");
        }
    }

    #[test]
    fn index_out_of_range_is_an_error() -> Result<()> {
        let dataset = phantom("count = 2\nsize = 16\nslices = 2")?;
        assert!(dataset.load(2).is_err());
        Ok(())
    }

    #[test]
    fn registered_default_config_parses_back_to_the_defaults() -> Result<()> {
        let entry = registry::datasets().get("phantom")?;
        let section = Section::inline("data.sources.x", "phantom", &(entry.default_config)())?;
        assert_eq!(section.parse::<PhantomConfig>()?, PhantomConfig::default());
        Ok(())
    }
}
