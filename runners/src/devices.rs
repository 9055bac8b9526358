//! `medssl devices`: what this build of medssl and its libtorch can run on, as libtorch sees
//! it (the question `python -m torch.utils.collect_env` answers for PyTorch). scripts/gpu-check
//! starts with it.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Devices {
    /// CUDA devices libtorch can use (0 without a GPU or driver).
    pub cuda_devices: i64,
    pub cudnn: bool,
    /// Whether this build has NCCL process groups (the CUDA header wheels were found).
    pub nccl_built: bool,
    /// libtorch's intra-op threads.
    pub cpu_threads: i32,
    /// Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX), where `precision = "bf16"`
    /// is fast; without it bf16 is emulated and slower than fp32.
    pub cpu_bf16: bool,
}

pub fn devices() -> Devices {
    let cuda_devices = if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    };
    Devices {
        cuda_devices,
        cudnn: cuda_devices > 0 && tch::Cuda::cudnn_is_available(),
        nccl_built: torch_ext::ProcessGroup::NCCL_BUILT,
        cpu_threads: tch::get_num_threads(),
        cpu_bf16: cpu_has_bf16(),
    }
}

/// The flags of /proc/cpuinfo (Linux); false where it cannot be read.
fn cpu_has_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|line| line.starts_with("flags"))
            .any(|line| line.split_whitespace().any(|f| f == "avx512_bf16" || f == "amx_bf16"))
    })
}

impl Devices {
    pub fn table(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        format!(
            "CUDA devices  {}\ncuDNN         {}\nNCCL built    {}\nCPU threads   {}\nCPU bf16      {}\n",
            self.cuda_devices,
            yes(self.cudnn),
            yes(self.nccl_built),
            self.cpu_threads,
            yes(self.cpu_bf16)
        )
    }
}
