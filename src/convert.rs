//! A model's weights in another format: f32, bf16, int8 or 4-bit. Made in
//! memory for `--weights` (a quick try without a converted directory) and
//! written to a model directory by `dllm quantize`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::bf16;

use crate::checkpoint::{Checkpoint, Dtype};
use crate::error::{Error, Result};
use crate::model::{expected_tensors, is_quantizable, Model};
use crate::quant::{quantize, scale_name, MatrixView, Quantization};

/// What the weights are to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Every tensor in f32: the reference path.
    F32,
    /// Every matrix (embedding included) in bf16; norms and biases as they are.
    BF16,
    /// The projections and head quantized; everything else as it is.
    Quantized(Quantization),
}

impl WeightFormat {
    pub fn name(self) -> String {
        match self {
            WeightFormat::F32 => "f32".into(),
            WeightFormat::BF16 => "bf16".into(),
            WeightFormat::Quantized(q) => q.name(),
        }
    }

    pub fn quantization(self) -> Option<Quantization> {
        match self {
            WeightFormat::Quantized(q) => Some(q),
            _ => None,
        }
    }
}

/// One tensor of a checkpoint: name, dtype, shape, little-endian bytes.
pub type TensorData = (String, Dtype, Vec<usize>, Vec<u8>);

/// The tensors that the tensor `name` of `shape`, with f32 `values`,
/// becomes in `format` (two for a quantized matrix: values and scales).
/// `quantizable` says whether it is a projection or the head.
pub fn convert_tensor(
    name: String,
    shape: Vec<usize>,
    values: &[f32],
    format: WeightFormat,
    quantizable: bool,
) -> Vec<TensorData> {
    match format {
        WeightFormat::Quantized(q) if quantizable => {
            let quantized = quantize(values, shape[0], shape[1], q);
            vec![
                (
                    scale_name(&name),
                    Dtype::F32,
                    quantized.scale_shape,
                    bytemuck::cast_slice(&quantized.scales).to_vec(),
                ),
                (name, quantized.dtype, quantized.shape, quantized.values),
            ]
        }
        WeightFormat::BF16 if shape.len() == 2 => {
            let rounded: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            vec![(
                name,
                Dtype::BF16,
                shape,
                bytemuck::cast_slice(&rounded).to_vec(),
            )]
        }
        _ => vec![(
            name,
            Dtype::F32,
            shape,
            bytemuck::cast_slice(values).to_vec(),
        )],
    }
}

/// `model`'s tensors in `format`. Tensors `format` leaves as they are keep
/// their bytes; others go through f32 (a quantized source is dequantized
/// first, one matrix at a time).
fn converted_tensors(model: &Model, format: WeightFormat) -> Result<Vec<TensorData>> {
    let config = &model.config;
    let checkpoint = &model.checkpoint;
    let mut out = Vec::new();
    for (name, shape) in expected_tensors(config) {
        let quantizable = is_quantizable(config, &name, &shape);
        let changes = match format {
            WeightFormat::F32 => true,
            WeightFormat::BF16 => shape.len() == 2,
            WeightFormat::Quantized(_) => quantizable,
        };
        let stored_as = if quantizable {
            model.quantization
        } else {
            None
        };
        if !changes && stored_as.is_none() {
            let t = checkpoint.tensor(&name)?;
            out.push((name, t.dtype, shape, t.bytes.to_vec()));
            continue;
        }
        let values = if shape.len() == 2 {
            MatrixView::open(checkpoint, &name, [shape[0], shape[1]], stored_as)?.to_f32()
        } else {
            checkpoint.tensor(&name)?.to_f32()
        };
        let target = if changes { format } else { WeightFormat::F32 };
        out.extend(convert_tensor(name, shape, &values, target, quantizable));
    }
    Ok(out)
}

/// `model` with its weights in `format`, held in memory.
pub fn convert(model: Model, format: WeightFormat) -> Result<Model> {
    check_rows(&model, format)?;
    let checkpoint = Checkpoint::from_tensors(converted_tensors(&model, format)?);
    Ok(Model {
        quantization: format.quantization(),
        checkpoint,
        ..model
    })
}

/// Writes `model` in `format` as the model directory `out`: config.json
/// with its `quantization_config`, one model.safetensors, and the
/// tokenizer files it has.
pub fn write(model: &Model, format: WeightFormat, out: &Path) -> Result<()> {
    check_rows(model, format)?;
    let config_path = model.dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: config_path.clone(),
            source,
        })?;
    let object = config.as_object_mut().ok_or_else(|| Error::Config {
        path: config_path.clone(),
        message: "not a JSON object".into(),
    })?;
    match format.quantization() {
        Some(q) => object.insert("quantization_config".into(), q.to_config()),
        None => object.remove("quantization_config"),
    };
    let tensors = converted_tensors(model, format)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let write_err = |path: PathBuf| move |e| Error::io(path, e);
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(dtype.safetensors(), shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(format!("cannot lay out the converted tensors: {e}")))?;
    let weights = out.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &weights)
        .map_err(|e| Error::io(&weights, std::io::Error::other(e.to_string())))?;
    let json = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    let config_out = out.join("config.json");
    std::fs::write(&config_out, json).map_err(write_err(config_out.clone()))?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let from = model.dir.join(file);
        if from.exists() {
            std::fs::copy(&from, out.join(file)).map_err(write_err(from.clone()))?;
        }
    }
    Ok(())
}

/// Refuses a format that does not fit every matrix row (a 4-bit group
/// size that does not divide it), before any work is done.
fn check_rows(model: &Model, format: WeightFormat) -> Result<()> {
    let Some(q) = format.quantization() else {
        return Ok(());
    };
    for (name, shape) in expected_tensors(&model.config) {
        if is_quantizable(&model.config, &name, &shape) {
            q.check_row(&name, shape[1])?;
        }
    }
    Ok(())
}
