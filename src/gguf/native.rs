//! A GGUF tensor's own ggml blocks in Hugging Face layout, for running it
//! at its own type (`qtensor::QTensor`): the blocks of a `[out, in]`
//! weight are its rows in order, so the only change from the file is
//! llama.cpp's Q/K row permutation, undone by moving whole rows of blocks
//! (the same row order [`super::convert::tensor_to_bytes`] produces).
//! Dequantizing the result with `dequant::dequantize` gives exactly the
//! values of the converted f32 checkpoint.

use super::convert::{unpermute_rows, PlannedTensor};
use super::reader::GgufFile;
use crate::error::{Error, Result};

/// The ggml block bytes of 2D tensor `p` in HF row order. Refuses 1D
/// tensors, and blocks whose dequantized values are NaN or infinite
/// (naming the tensor), as conversion does.
pub fn native_blocks(g: &GgufFile, p: &PlannedTensor<'_>) -> Result<Vec<u8>> {
    let t = p.info;
    let terr = |msg: String| Error::Tensor {
        path: g.path().to_path_buf(),
        tensor: t.name.clone(),
        msg,
    };
    if t.dims.len() != 2 {
        return Err(terr(format!(
            "native blocks are for 2D weights, this tensor has dims {:?}",
            t.dims
        )));
    }
    let bytes = g.tensor_bytes(t);
    let n_rows = t.n_rows() as usize;
    let row_len = t.row_len() as usize;
    let bs = t.ty.block_size();
    if n_rows == 0 || row_len % bs != 0 || bytes.len() % n_rows != 0 {
        return Err(terr(format!(
            "rows of {row_len} elements are not whole {} blocks of {bs}",
            t.ty
        )));
    }
    let row_bytes = bytes.len() / n_rows;
    // every value finite (a NaN / Inf scale would poison whole blocks)
    let mut scratch = vec![0f32; row_len];
    for r in 0..n_rows {
        g.dequantize_rows(t, r as u64, &mut scratch)?;
        if let Some(c) = scratch.iter().position(|x| !x.is_finite()) {
            return Err(terr(format!(
                "dequantized element (row {r}, column {c}, ggml type {}) is {}; weights must be \
                 finite",
                t.ty, scratch[c]
            )));
        }
    }
    Ok(match p.unpermute_heads {
        None => bytes.to_vec(),
        Some(n_head) => {
            let src = unpermute_rows(n_rows, n_head).map_err(terr)?;
            let mut out = Vec::with_capacity(bytes.len());
            for s in src {
                out.extend_from_slice(&bytes[s * row_bytes..(s + 1) * row_bytes]);
            }
            out
        }
    })
}
