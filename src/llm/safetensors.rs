//! Hugging Face safetensors weights (one file or shards) read one tensor at a time from a memory
//! map: each tensor is copied out in its stored dtype when the loader asks for it, and the pages of
//! the map it came from are given back at once (`MADV_DONTNEED`), so the file's pages never count
//! towards the process's resident memory beside the weights made of them.

use super::llama::WeightSource;
use candle_core::safetensors::Load;
use candle_core::{Device, Result, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Metadata, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

/// One mapped file and its parsed header.
struct File {
    path: PathBuf,
    map: Mmap,
    /// Where the tensor data starts (after the 8-byte length and the header).
    data_start: usize,
    meta: Metadata,
}

pub struct Streamed {
    files: Vec<File>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl Streamed {
    /// Maps every file and reads their headers; the error names the file.
    pub fn open(paths: &[PathBuf]) -> std::result::Result<Self, (PathBuf, String)> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for p in paths {
            let f = std::fs::File::open(p).map_err(|e| (p.clone(), e.to_string()))?;
            // SAFETY: the map is read only; a file changed under a running process is outside
            // what any memory-mapped reader (candle's, PyTorch's) can guard against.
            let m = unsafe { Mmap::map(&f) }.map_err(|e| (p.clone(), e.to_string()))?;
            let (n, meta) = SafeTensors::read_metadata(&m)
                .map_err(|e| (p.clone(), format!("not a readable safetensors file: {e}")))?;
            for name in meta.tensors().keys() {
                index.insert(name.clone(), files.len());
            }
            files.push(File {
                path: p.clone(),
                map: m,
                data_start: 8 + n,
                meta,
            });
        }
        Ok(Self { files, index })
    }
}

impl WeightSource for Streamed {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(&f) = self.index.get(name) else {
            return Ok(None);
        };
        let File {
            path,
            map,
            data_start,
            meta,
        } = &self.files[f];
        let bad = |e: String| candle_core::Error::Msg(format!("{}: {name}: {e}", path.display()));
        let info = meta
            .info(name)
            .ok_or_else(|| bad("not in the header".into()))?;
        let (start, end) = (
            data_start + info.data_offsets.0,
            data_start + info.data_offsets.1,
        );
        // The header was validated against the file's length when it was read.
        let data = &map[start..end];
        let view = TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| bad(e.to_string()))?;
        let t = view.load(&Device::Cpu)?;
        // Give the map's pages of this tensor back (whole pages inside its byte range).
        let page = 4096;
        let (a, b) = (start.div_ceil(page) * page, end / page * page);
        if b > a {
            // SAFETY: the range lies inside the map, and nothing borrows these bytes any more
            // (the tensor was copied out); on a read-only file map the pages are simply re-read
            // from the file if touched again.
            let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, a, b - a) };
        }
        Ok(Some(t))
    }
}
