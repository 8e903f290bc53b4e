use anyhow::Result;
use candle_core::Device;

use adapterkit::model::load::ModelFiles;

#[derive(clap::Args)]
pub struct Args {
    /// A local model directory or a Hugging Face model id.
    #[arg(long)]
    model: String,
    /// Also show the trainable parameters of an adapter: a preset name (houlsby, pfeiffer,
    /// parallel, ...) or a saved adapter directory.
    #[arg(long)]
    adapter: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// How many encoder tensors an adapter directory carries in `base_weights.safetensors`
/// (trained with it; Python's `adapters` does not read them), if any.
fn base_weight_tensors(adapter: &str) -> Result<Option<usize>> {
    let path = std::path::Path::new(adapter).join(adapterkit::io::adapter_dir::BASE_WEIGHTS);
    if !path.exists() {
        return Ok(None);
    }
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Some(tensors.len()))
}

/// Parameters of an adapter (without its head) on `model`, and the size of its weights file.
fn adapter_size(
    adapter: &str,
    model: &adapterkit::model::BertModel,
) -> Result<(usize, Option<u64>)> {
    let path = std::path::Path::new(adapter);
    if path.is_dir() {
        let tuned = adapterkit::io::adapter_dir::load(path, model.clone(), &Device::Cpu)?;
        let count = tuned.adapter.as_ref().map_or(0, |a| a.params().count());
        let file = std::fs::metadata(path.join(adapterkit::io::adapter_dir::ADAPTER_WEIGHTS))
            .ok()
            .map(|m| m.len());
        return Ok((count, file));
    }
    let config = adapterkit::methods::adapter::AdapterConfig::preset(adapter)?;
    let mut rng = adapterkit::rng::SeededRng::new(0);
    let adapter = adapterkit::methods::adapter::Adapter::new(
        adapter,
        &config,
        &model.config,
        &mut rng,
        &Device::Cpu,
    )?;
    Ok((adapter.params().count(), None))
}

pub fn run(args: Args) -> Result<()> {
    let files = ModelFiles::locate(&args.model)?;
    let config = files.load_config()?;
    let model = files.load_model(&config, &Device::Cpu)?;
    let parameters = model.parameter_count();
    let adapter = args
        .adapter
        .as_deref()
        .map(|a| adapter_size(a, &model))
        .transpose()?;
    let base_weights = args
        .adapter
        .as_deref()
        .map(base_weight_tensors)
        .transpose()?
        .flatten();
    if args.json {
        let mut info = serde_json::json!({
            "model": files.source,
            "weights": files.weights,
            "model_type": config.model_type,
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "max_tokens": config.max_tokens(),
            "has_pooler": model.pooler.is_some(),
            "parameters": parameters,
        });
        if let Some((count, file)) = adapter {
            info["adapter_parameters"] = count.into();
            info["adapter_share"] = (count as f64 / parameters as f64).into();
            info["adapter_file_bytes"] = file.into();
        }
        if let Some(n) = base_weights {
            info["adapter_base_weight_tensors"] = n.into();
        }
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("model:        {}", files.source);
        println!("weights:      {}", files.weights.display());
        println!(
            "architecture: {} (pooler: {})",
            config.model_type,
            if model.pooler.is_some() { "yes" } else { "no" }
        );
        println!(
            "layers:       {} x (hidden {}, {} heads, feed-forward {})",
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size
        );
        println!(
            "vocabulary:   {} tokens, {} positions ({} tokens a sequence)",
            config.vocab_size,
            config.max_position_embeddings,
            config.max_tokens()
        );
        println!("parameters:   {parameters}");
        if let Some((count, file)) = adapter {
            let file = file
                .map(|b| format!(", file {:.1} KiB", b as f64 / 1024.0))
                .unwrap_or_default();
            println!(
                "adapter:      {count} parameters, {:.2}% of the model{file}",
                100.0 * count as f64 / parameters as f64
            );
        }
        if let Some(n) = base_weights {
            println!(
                "base weights: {n} encoder tensors trained with the adapter \
                 (base_weights.safetensors; Python's `adapters` does not read them)"
            );
        }
    }
    Ok(())
}
