//! Device selection from the config's `device` key.

use anyhow::{bail, Result};
use tch::Device;

/// Parses `cpu`, `cuda`, `cuda:N` or `auto`. Asking for CUDA where none is available is an
/// error at start, not a silent fall-back to the CPU. Under a multi-process launch, `cuda`
/// and `auto` take the GPU of the process's local rank (`cuda:LOCAL_RANK`), as every
/// torchrun script does.
pub fn resolve(name: &str) -> Result<Device> {
    let local_rank = crate::distributed::Launch::from_env()?.local_rank;
    match name {
        "cuda" => resolve_index(&format!("cuda:{local_rank}"), name),
        "auto" => match resolve_index("auto", name)? {
            Device::Cuda(_) => resolve_index(&format!("cuda:{local_rank}"), name),
            cpu => Ok(cpu),
        },
        _ => resolve_index(name, name),
    }
}

/// `run.deterministic` and `run.cudnn_benchmark`, applied to the whole process.
///
/// - `deterministic`: cuDNN's deterministic algorithms only, no benchmark mode, and
///   `torch.use_deterministic_algorithms(True, warn_only=True)`: an op that has no
///   deterministic CUDA kernel warns rather than stopping a long run. cuBLAS needs
///   `CUBLAS_WORKSPACE_CONFIG` for reproducible matrix products; it is set to `:4096:8`
///   (PyTorch's advice) unless the environment has one. What makes a CUDA run resume
///   bit-exactly, as CPU runs do without it.
/// - `cudnn_benchmark`: cuDNN times the algorithms for each new input shape and keeps the
///   fastest: faster for fixed shapes, not reproducible. PyTorch's default is off.
///
/// The two exclude each other. On the CPU neither changes a result.
pub fn apply_determinism(deterministic: bool, cudnn_benchmark: bool) -> Result<()> {
    if deterministic && cudnn_benchmark {
        bail!("config keys `run.deterministic` and `run.cudnn_benchmark` are both true: benchmark mode picks algorithms by timing, which is not deterministic; set one of them");
    }
    if deterministic && std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
        std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
    }
    torch_ext::set_determinism(torch_ext::Determinism {
        cudnn_deterministic: deterministic,
        cudnn_benchmark,
        deterministic_algorithms: deterministic,
        warn_only: true,
    })?;
    Ok(())
}

/// [`resolve`] without the local rank; `asked` is the config's value, for messages.
fn resolve_index(name: &str, asked: &str) -> Result<Device> {
    let cuda_count = || {
        if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        }
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if cuda_count() > 0 { Device::Cuda(0) } else { Device::Cpu }),
        _ => {
            let index = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
                    Some(i) => i,
                    None => bail!("config key `device`: `{name}` is not a device; expected cpu, cuda, cuda:N or auto"),
                },
                None => bail!("config key `device`: `{name}` is not a device; expected cpu, cuda, cuda:N or auto"),
            };
            let available = cuda_count();
            if available == 0 {
                bail!("config key `device` asks for `{asked}`, but no CUDA device is available (libtorch sees none); use device = \"cpu\" or \"auto\"");
            }
            if index >= available {
                bail!("config key `device` asks for `{asked}` (here `{name}`), but only {available} CUDA device(s) are available");
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// The environment variable that picks the device of the device-aware tests.
pub const TEST_DEVICE_VAR: &str = "MEDSSL_TEST_DEVICE";

/// The device that the device-aware tests build their variables and tensors on (the
/// workspace's composition and precision tests, the objectives' and heads' unit tests):
/// `MEDSSL_TEST_DEVICE` = `cpu` (the default, also when unset or empty), `cuda` or `cuda:N`.
/// `scripts/gpu-check` sets it to `cuda` to run those tests on the GPU.
///
/// Panics, naming the variable, on any other value and where the CUDA device asked for is
/// absent: a test asked to prove the CUDA path must fail, neither pass on the CPU instead
/// nor stop deep inside libtorch.
pub fn test_device() -> Device {
    let value = match std::env::var(TEST_DEVICE_VAR) {
        Ok(value) => value,
        Err(std::env::VarError::NotPresent) => String::new(),
        Err(std::env::VarError::NotUnicode(raw)) => {
            panic!("{TEST_DEVICE_VAR}={raw:?} is not a test device; expected cpu (the default), cuda or cuda:N")
        }
    };
    test_device_named(&value).unwrap_or_else(|e| panic!("{e}"))
}

/// [`test_device`] for the variable's value `value`.
fn test_device_named(value: &str) -> Result<Device> {
    let value = value.trim();
    let index = match value {
        "" | "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match value.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(index) => index,
            None => {
                bail!("{TEST_DEVICE_VAR}=`{value}` is not a test device; expected cpu (the default), cuda or cuda:N")
            }
        },
    };
    let available = if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    if available == 0 {
        bail!("{TEST_DEVICE_VAR}=`{value}` asks for CUDA, but no CUDA device is available (libtorch sees none); unset it or set it to `cpu` to run these tests on the CPU");
    }
    if index >= available {
        bail!("{TEST_DEVICE_VAR}=`{value}`, but only {available} CUDA device(s) are available");
    }
    Ok(Device::Cuda(index))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_parse_and_bad_names_are_errors() {
        assert_eq!(super::resolve("cpu").unwrap(), tch::Device::Cpu);
        assert!(super::resolve("auto").is_ok());
        let err = super::resolve("gpu").unwrap_err().to_string();
        assert!(err.contains("`gpu`") && err.contains("cuda:N"), "{err}");
        if !tch::Cuda::is_available() {
            let err = super::resolve("cuda").unwrap_err().to_string();
            assert!(err.contains("no CUDA device"), "{err}");
        }
    }

    #[test]
    fn test_devices_parse_and_bad_ones_are_errors_naming_the_variable() {
        for cpu in ["", "cpu", " cpu "] {
            assert_eq!(super::test_device_named(cpu).unwrap(), tch::Device::Cpu, "`{cpu}`");
        }
        for bad in ["gpu", "cuda0", "cuda:x", "cuda:-1", "auto"] {
            let err = super::test_device_named(bad).unwrap_err().to_string();
            assert!(
                err.contains("MEDSSL_TEST_DEVICE") && err.contains(&format!("`{bad}`")) && err.contains("cuda:N"),
                "{err}"
            );
        }
        if !tch::Cuda::is_available() {
            for cuda in ["cuda", "cuda:1"] {
                let err = super::test_device_named(cuda).unwrap_err().to_string();
                assert!(
                    err.contains("MEDSSL_TEST_DEVICE") && err.contains("no CUDA device is available"),
                    "{err}"
                );
            }
        }
    }
}
