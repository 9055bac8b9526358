//! NumPy arrays (one `.npy` file, or one member of an `.npz` archive) read with the `npyz`
//! crate into a tensor of the matching kind, for the `npy` and `medmnist` readers.
//!
//! Every numeric dtype is accepted, in either byte order and in C or Fortran order: bool,
//! int8 to int64, uint8, float16, float32 and float64 keep their kind; uint16 widens to
//! int32 and uint32 to int64 (libtorch has no unsigned kinds wider than 8 bits); uint64
//! becomes float64 (exact up to 2^53, far beyond any intensity). Complex, string, date,
//! structured and pickled arrays are errors.

use medssl_core::prelude::*;
use npyz::{DType, Deserialize, NpyFile, Order, TypeChar};
use std::io::Read;

/// The shape and dtype of an array, as its header gives them, for messages.
pub fn describe_header<R: Read>(npy: &NpyFile<R>) -> String {
    format!("shape {:?}, dtype {}", npy.shape(), npy.dtype().descr())
}

/// The array's stored element type in the vocabulary of `Volume::dtype` (`uint8`, `int16`,
/// `float32`, `bool`, ...), whatever its byte order; `None` for dtypes `read_tensor` rejects.
pub fn dtype_name<R: Read>(npy: &NpyFile<R>) -> Option<String> {
    let DType::Plain(type_str) = npy.dtype() else {
        return None;
    };
    let bits = type_str.size_field() * 8;
    match (type_str.type_char(), bits) {
        (TypeChar::Bool, 8) => Some("bool".into()),
        (TypeChar::Int, 8 | 16 | 32 | 64) => Some(format!("int{bits}")),
        (TypeChar::Uint, 8 | 16 | 32 | 64) => Some(format!("uint{bits}")),
        (TypeChar::Float, 16 | 32 | 64) => Some(format!("float{bits}")),
        _ => None,
    }
}

/// Reads the whole array into a CPU tensor of its shape (C order), in the kind that holds
/// its dtype exactly (see the module's doc).
pub fn read_tensor<R: Read>(npy: NpyFile<R>) -> Result<Tensor> {
    let shape: Vec<i64> = npy
        .shape()
        .iter()
        .map(|&n| i64::try_from(n).context("the array's shape overflows"))
        .collect::<Result<_>>()?;
    let order = npy.order();
    let DType::Plain(type_str) = npy.dtype() else {
        bail!(
            "dtype {} is a structured or sub-array type; expected numbers",
            npy.dtype().descr()
        );
    };
    let size = type_str.size_field();
    let flat = match (type_str.type_char(), size) {
        (TypeChar::Bool, 1) => Tensor::from_slice(&npy.into_vec::<bool>()?),
        (TypeChar::Int, 1) => Tensor::from_slice(&npy.into_vec::<i8>()?),
        (TypeChar::Int, 2) => Tensor::from_slice(&npy.into_vec::<i16>()?),
        (TypeChar::Int, 4) => Tensor::from_slice(&npy.into_vec::<i32>()?),
        (TypeChar::Int, 8) => Tensor::from_slice(&npy.into_vec::<i64>()?),
        (TypeChar::Uint, 1) => Tensor::from_slice(&npy.into_vec::<u8>()?),
        (TypeChar::Uint, 2) => Tensor::from_slice(&widen::<u16, i32>(npy)?),
        (TypeChar::Uint, 4) => Tensor::from_slice(&widen::<u32, i64>(npy)?),
        (TypeChar::Uint, 8) => {
            Tensor::from_slice(&npy.into_vec::<u64>()?.into_iter().map(|v| v as f64).collect::<Vec<_>>())
        }
        (TypeChar::Float, 2) => Tensor::from_slice(&npy.into_vec::<npyz::half::f16>()?),
        (TypeChar::Float, 4) => Tensor::from_slice(&npy.into_vec::<f32>()?),
        (TypeChar::Float, 8) => Tensor::from_slice(&npy.into_vec::<f64>()?),
        _ => bail!("dtype {type_str} is not supported; expected bool, integers or floats of up to 64 bits"),
    };
    let expected: i64 = shape.iter().product();
    ensure!(
        flat.numel() as i64 == expected,
        "the data holds {} values but the shape {shape:?} needs {expected}",
        flat.numel()
    );
    Ok(match order {
        Order::C => flat.view(shape.as_slice()),
        // Fortran order stores the first axis fastest: the data is the C-order array of the
        // reversed shape, whose axes are then reversed back.
        Order::Fortran => {
            let reversed_shape: Vec<i64> = shape.iter().rev().copied().collect();
            let reversed_axes: Vec<i64> = (0..shape.len() as i64).rev().collect();
            flat.view(reversed_shape.as_slice())
                .permute(reversed_axes.as_slice())
                .contiguous()
        }
    })
}

/// Reads elements of type `S` and converts each to the wider `T`.
fn widen<S: Deserialize, T: From<S>>(npy: NpyFile<impl Read>) -> Result<Vec<T>> {
    Ok(npy.into_vec::<S>()?.into_iter().map(T::from).collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use npyz::WriterBuilder;
    use std::path::Path;

    /// Writes `data` with `shape` as a `.npy` file (C order, little-endian).
    pub(crate) fn write_npy<T: npyz::AutoSerialize>(path: &Path, shape: &[u64], data: &[T]) -> Result<()> {
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut writer = npyz::WriteOptions::<T>::new()
            .default_dtype()
            .shape(shape)
            .writer(file)
            .begin_nd()?;
        for value in data {
            writer.push(value)?;
        }
        writer.finish()?;
        Ok(())
    }

    fn round_trip<T: npyz::AutoSerialize>(data: &[T], shape: &[u64]) -> Result<Tensor> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("a.npy");
        write_npy(&path, shape, data)?;
        read_tensor(NpyFile::new(std::fs::File::open(&path)?)?)
    }

    #[test]
    fn every_numeric_dtype_reads_back_in_a_kind_that_holds_it() -> Result<()> {
        let shape = [2u64, 3];
        let expected: Vec<f64> = (0..6).map(f64::from).collect();
        let check = |tensor: Tensor, kind: Kind| {
            assert_eq!(tensor.kind(), kind);
            assert_eq!(tensor.size(), [2, 3]);
            let values = Vec::<f64>::try_from(&tensor.to_kind(Kind::Double).flatten(0, -1)).unwrap();
            assert_eq!(values, expected);
        };
        check(round_trip(&[0i8, 1, 2, 3, 4, 5], &shape)?, Kind::Int8);
        check(round_trip(&[0i16, 1, 2, 3, 4, 5], &shape)?, Kind::Int16);
        check(round_trip(&[0i32, 1, 2, 3, 4, 5], &shape)?, Kind::Int);
        check(round_trip(&[0i64, 1, 2, 3, 4, 5], &shape)?, Kind::Int64);
        check(round_trip(&[0u8, 1, 2, 3, 4, 5], &shape)?, Kind::Uint8);
        check(round_trip(&[0u16, 1, 2, 3, 4, 5], &shape)?, Kind::Int);
        check(round_trip(&[0u32, 1, 2, 3, 4, 5], &shape)?, Kind::Int64);
        check(round_trip(&[0u64, 1, 2, 3, 4, 5], &shape)?, Kind::Double);
        let halves: Vec<npyz::half::f16> = (0..6).map(|v| npyz::half::f16::from_f32(v as f32)).collect();
        check(round_trip(&halves, &shape)?, Kind::Half);
        check(round_trip(&[0f32, 1., 2., 3., 4., 5.], &shape)?, Kind::Float);
        check(round_trip(&[0f64, 1., 2., 3., 4., 5.], &shape)?, Kind::Double);
        let flags = round_trip(&[false, true, false, true, false, true], &shape)?;
        assert_eq!(flags.kind(), Kind::Bool);
        Ok(())
    }

    #[test]
    fn dtype_names_follow_the_stored_type_not_the_tensor_kind() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let name_of = |file: &str| -> Result<Option<String>> {
            Ok(dtype_name(&NpyFile::new(std::fs::File::open(
                folder.path().join(file),
            )?)?))
        };
        write_npy(&folder.path().join("u8.npy"), &[2], &[0u8, 1])?;
        write_npy(&folder.path().join("i16.npy"), &[2], &[0i16, 1])?;
        // uint16 reads into an int32 tensor; its name must still be the stored one.
        write_npy(&folder.path().join("u16.npy"), &[2], &[0u16, 1])?;
        write_npy(&folder.path().join("f64.npy"), &[2], &[0f64, 1.])?;
        write_npy(&folder.path().join("b.npy"), &[2], &[false, true])?;
        for (file, expected) in [
            ("u8.npy", "uint8"),
            ("i16.npy", "int16"),
            ("u16.npy", "uint16"),
            ("f64.npy", "float64"),
            ("b.npy", "bool"),
        ] {
            assert_eq!(name_of(file)?.as_deref(), Some(expected), "{file}");
        }
        Ok(())
    }

    #[test]
    fn fortran_order_and_big_endian_arrays_read_in_logical_order() -> Result<()> {
        let folder = tempfile::tempdir()?;
        let path = folder.path().join("f.npy");
        // The logical array [[0, 1, 2], [3, 4, 5]] as big-endian int16 in Fortran order.
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut writer = npyz::WriteOptions::<i16>::new()
            .dtype(DType::new_scalar(">i2".parse()?))
            .order(Order::Fortran)
            .shape(&[2, 3])
            .writer(file)
            .begin_nd()?;
        writer.extend([0i16, 3, 1, 4, 2, 5])?;
        writer.finish()?;
        let npy = NpyFile::new(std::fs::File::open(&path)?)?;
        assert_eq!(dtype_name(&npy).as_deref(), Some("int16"));
        let tensor = read_tensor(npy)?;
        assert_eq!(tensor.size(), [2, 3]);
        assert_eq!(tensor.int64_value(&[0, 1]), 1);
        assert_eq!(tensor.int64_value(&[1, 0]), 3);
        assert_eq!(tensor.int64_value(&[1, 2]), 5);
        Ok(())
    }
}
