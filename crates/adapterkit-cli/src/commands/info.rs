use anyhow::Result;
use candle_core::Device;

use adapterkit::model::load::ModelFiles;

#[derive(clap::Args)]
pub struct Args {
    /// A local model directory or a Hugging Face model id.
    #[arg(long)]
    model: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let files = ModelFiles::locate(&args.model)?;
    let config = files.load_config()?;
    let model = files.load_model(&config, &Device::Cpu)?;
    let parameters = model.parameter_count();
    if args.json {
        let info = serde_json::json!({
            "model": files.source,
            "weights": files.weights,
            "model_type": config.model_type,
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "has_pooler": model.pooler.is_some(),
            "parameters": parameters,
        });
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
            "vocabulary:   {} tokens, {} positions",
            config.vocab_size, config.max_position_embeddings
        );
        println!("parameters:   {parameters}");
    }
    Ok(())
}
