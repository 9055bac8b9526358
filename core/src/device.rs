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
}
