//! `--device cpu|cuda[:N]|auto`.

use candle_core::Device;

/// What `--device auto` picks: CUDA device 0 when llara was built with CUDA and it starts, else
/// the CPU; with the reason, in words.
pub fn auto() -> (Device, String) {
    if !candle_core::utils::cuda_is_available() {
        return (
            Device::Cpu,
            "cpu (this llara was built without CUDA; rebuild with `--features cuda` for a GPU)"
                .into(),
        );
    }
    match Device::new_cuda(0) {
        Ok(d) => (
            d,
            "cuda:0 (llara was built with CUDA and device 0 started)".into(),
        ),
        Err(e) => (
            Device::Cpu,
            format!("cpu (llara was built with CUDA but device 0 did not start: {e})"),
        ),
    }
}

/// Why `--device` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {0}: expected cpu, cuda, cuda:N or auto")]
    Unknown(String),
    #[error("--device {0}: this llara was built without CUDA (rebuild with `--features cuda`) or no GPU is present")]
    NoCuda(String),
    #[error("--device {spec}: {source}")]
    Start {
        spec: String,
        source: candle_core::Error,
    },
}

/// Parses a device flag. `auto` is [`auto`]; it logs what it chose and why.
pub fn parse(spec: &str) -> Result<Device, DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            let (d, why) = auto();
            if d.is_cpu() && candle_core::utils::cuda_is_available() {
                tracing::warn!("--device auto: {why}");
            } else {
                tracing::info!("--device auto: {why}");
            }
            Ok(d)
        }
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| DeviceError::Unknown(spec.to_string()))?,
                None => return Err(DeviceError::Unknown(spec.to_string())),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError::NoCuda(spec.to_string()));
            }
            Device::new_cuda(ordinal).map_err(|source| DeviceError::Start {
                spec: spec.to_string(),
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses() {
        assert!(super::parse("cpu").unwrap().is_cpu());
        assert!(super::parse("auto").is_ok());
        let (d, why) = super::auto();
        if !candle_core::utils::cuda_is_available() {
            assert!(d.is_cpu() && why.contains("without CUDA"), "{why}");
        } else {
            assert!(
                why.starts_with(if d.is_cpu() { "cpu" } else { "cuda:0" }),
                "{why}"
            );
        }
        assert!(super::parse("tpu")
            .unwrap_err()
            .to_string()
            .contains("expected cpu"));
        if !candle_core::utils::cuda_is_available() {
            assert!(super::parse("cuda:0")
                .unwrap_err()
                .to_string()
                .contains("without CUDA"));
        }
    }
}
