use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;

use adapterkit::io::atomic::write_atomic;
use adapterkit::methods::fusion::{mean_attention, Attention};
use adapterkit::model::hooks::Position;
use adapterkit::model::Mode;
use adapterkit::train::batches::EncodedDataset;

use crate::data_args::DataArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    tuned: super::TunedArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Which split of a built-in dataset.
    #[arg(long, default_value = "test")]
    split: String,
    /// Output path without extension: writes OUT.json and OUT.svg.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let device = Device::Cpu;
    let data = args.data.one(&args.split)?;
    let (tokenizer, model) = args.tuned.load(&super::MaxSeqLen::default(), &device)?;
    let fusion = model
        .fusion
        .as_ref()
        .with_context(|| format!("{} holds no AdapterFusion", args.tuned.adapter[0].display()))?;
    let recorder = fusion.recording();
    let names: Vec<String> = fusion.adapters.iter().map(|a| a.name.clone()).collect();
    let encoded = EncodedDataset::new(&data, &tokenizer, &model.head.config)?;

    // Sum of per-batch mean attentions weighted by real tokens, per (layer, position).
    let mut sums: std::collections::BTreeMap<(usize, &str), (Vec<f64>, f64)> = Default::default();
    for indices in encoded.eval_batches(64) {
        let (batch, _) = encoded.batch(&indices, tokenizer.pad_id(), &device)?;
        // Every position's fusion attention: the whole last layer, not just what the head reads.
        model.encoder.forward(&batch, &recorder, &mut Mode::Eval)?;
        let tokens = batch
            .attention_mask
            .to_dtype(candle_core::DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        for Attention {
            layer,
            position,
            probs,
        } in recorder.take()
        {
            let mean: Vec<f32> = mean_attention(&probs, &batch.attention_mask)?.to_vec1()?;
            let place = match position {
                Position::Attention => "attention",
                Position::Output => "output",
            };
            let entry = sums
                .entry((layer, place))
                .or_insert((vec![0.0; mean.len()], 0.0));
            for (s, m) in entry.0.iter_mut().zip(&mean) {
                *s += *m as f64 * tokens;
            }
            entry.1 += tokens;
        }
    }
    let rows: Vec<(String, Vec<f64>)> = sums
        .into_iter()
        .map(|((layer, place), (sum, tokens))| {
            (
                format!("layer {layer} {place}"),
                sum.iter().map(|s| s / tokens).collect(),
            )
        })
        .collect();
    let json = serde_json::json!({
        "adapters": names,
        "dataset": data.name,
        "examples": encoded.len(),
        "rows": rows.iter().map(|(label, w)| serde_json::json!({"place": label, "weights": w})).collect::<Vec<_>>(),
    });
    let json_path = args.out.with_extension("json");
    write_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    let svg_path = args.out.with_extension("svg");
    write_atomic(&svg_path, heatmap_svg(&names, &rows).as_bytes())?;
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// A layers x adapters heatmap, darker = more attention, each cell labelled with its weight.
fn heatmap_svg(adapters: &[String], rows: &[(String, Vec<f64>)]) -> String {
    let (cell_w, cell_h, left, top) = (110.0, 26.0, 150.0, 40.0);
    let width = left + cell_w * adapters.len() as f64 + 20.0;
    let height = top + cell_h * rows.len() as f64 + 20.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (j, name) in adapters.iter().enumerate() {
        let x = left + cell_w * (j as f64 + 0.5);
        svg += &format!(
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            top - 10.0,
            escape(name)
        );
    }
    for (i, (label, weights)) in rows.iter().enumerate() {
        let y = top + cell_h * i as f64;
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            left - 8.0,
            y + cell_h * 0.65,
            escape(label)
        );
        for (j, w) in weights.iter().enumerate() {
            let x = left + cell_w * j as f64;
            let shade = (255.0 * (1.0 - w.clamp(0.0, 1.0))).round() as u8;
            let ink = if *w > 0.5 { "white" } else { "black" };
            svg += &format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cell_w}\" height=\"{cell_h}\" fill=\"rgb({shade},{shade},255)\" stroke=\"#ccc\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{ink}\">{w:.2}</text>\n",
                x + cell_w / 2.0,
                y + cell_h * 0.65
            );
        }
    }
    svg + "</svg>\n"
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
