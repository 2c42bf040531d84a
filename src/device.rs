//! `--device cpu|cuda[:N]|auto`.

use candle_core::Device;

/// Parses a device flag. `auto` picks CUDA device 0 when llara was built with CUDA and a GPU is
/// present, else the CPU.
pub fn parse(spec: &str) -> Result<Device, String> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).or(Ok(Device::Cpu))
            } else {
                Ok(Device::Cpu)
            }
        }
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        format!("--device {spec}: expected cpu, cuda, cuda:N or auto")
                    })?,
                None => {
                    return Err(format!(
                        "--device {spec}: expected cpu, cuda, cuda:N or auto"
                    ))
                }
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(format!(
                    "--device {spec}: this llara was built without CUDA (rebuild with `--features cuda`) or no GPU is present"
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| format!("--device {spec}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses() {
        assert!(super::parse("cpu").unwrap().is_cpu());
        assert!(super::parse("auto").is_ok());
        assert!(super::parse("tpu").unwrap_err().contains("expected cpu"));
        if !candle_core::utils::cuda_is_available() {
            assert!(super::parse("cuda:0").unwrap_err().contains("without CUDA"));
        }
    }
}
