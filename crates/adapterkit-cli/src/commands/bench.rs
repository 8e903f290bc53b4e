use anyhow::Result;
use candle_core::Device;

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::bench::{
    composed_step, cpu_features, forward_flops, frozen_matmul_rate, inference_step, matmul_peak,
    optimizer_for, peak_rss_bytes, random_batch, time_per_step, training_step,
};
use adapterkit::composed_model::ComposedModel;
use adapterkit::data::TaskKind;
use adapterkit::heads::HeadConfig;
use adapterkit::methods::adapter::AdapterConfig;
use adapterkit::methods::composition::Setup;
use adapterkit::model::layer::Positions;
use adapterkit::model::{BertConfig, BertModel, Mode, Precision};

#[derive(clap::Args)]
pub struct Args {
    /// Model shape with random weights: minilm (6 x 384), bert-base (12 x 768), roberta-base
    /// (12 x 768, its embeddings and positions) or distilbert (6 x 768).
    #[arg(long, default_value = "minilm")]
    shape: String,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Timed steps per measurement (the median is reported), after one untimed step.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// What to measure, in order: inference (the logits: the last layer computes the first
    /// token alone), inference-all-positions (every position, as `transformers` computes it),
    /// prefix (inference as `inference`, through a prefix tuning of 30 positions: the FLOPs
    /// counted are the bare model's), adapter (Houlsby training), full (fine-tuning), lora (LoRA r=8, alpha=16 on q and v,
    /// training), ia3 ((IA)³ training), lora-stack (inference through two LoRAs composed
    /// unmerged, `stack(a,b)`), lora-split (inference of two LoRAs in one batch, half its
    /// rows each, `batch_split(a,b)`, as `serve` mixes adapters),
    /// ops (fused against composed LayerNorm and softmax, forward + backward, at this shape),
    /// bf16-matmul (the bf16 kernel's GFLOP/s on a 1024^3 product, against the f32 peak),
    /// int8-matmul (the same for the int8 kernel, activations quantised inside the timing),
    /// multitask (--tasks adapters one by one, then in one Parallel pass with the adapters of
    /// the lowest k layers dropped, for every k), adapter-drop (adapter training with no
    /// adapters in the lowest k layers, for every k).
    #[arg(long, value_delimiter = ',', default_value = "inference,adapter,full")]
    what: Vec<String>,
    /// Task adapters in the multitask measurement.
    #[arg(long, default_value_t = 8)]
    tasks: usize,
    /// Also train the encoder's LayerNorms in the adapter measurement (off: as AdapterHub's
    /// `train_adapter`, the side-by-side comparison's setting).
    #[arg(long)]
    train_layer_norms: bool,
    #[command(flatten)]
    dtype: super::DtypeArg,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The LoRA measured: r=8, alpha=16 (the common choice; the preset's alpha is 8, which costs
/// the same). (IA)³ as its preset.
fn lora_options(what: &str) -> Vec<(String, String)> {
    match what {
        "lora" => vec![("alpha".into(), "16".into())],
        _ => Vec::new(),
    }
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        args.seq_len > 0 && args.batch_size > 0 && args.steps > 0,
        "sizes and steps must be positive"
    );
    let config = match args.shape.as_str() {
        "minilm" => BertConfig::minilm_l6(),
        "bert-base" => BertConfig::bert_base(),
        "roberta-base" => BertConfig::roberta_base(),
        "distilbert" => BertConfig::distilbert_base(),
        other => {
            anyhow::bail!("unknown shape '{other}' (minilm, bert-base, roberta-base, distilbert)")
        }
    };
    anyhow::ensure!(
        args.seq_len <= config.max_tokens(),
        "--seq-len is at most {}",
        config.max_tokens()
    );
    let device = Device::Cpu;
    let (batch, targets) = random_batch(&config, args.batch_size, args.seq_len, 2, 1, &device)?;
    let head = HeadConfig::new(TaskKind::Classification, &["a".into(), "b".into()])?;
    let mut encoder = BertModel::random(&config, config_std(), 7, &device)?;
    encoder.set_precision(args.dtype.dtype)?;
    let flops = forward_flops(&config, args.batch_size, args.seq_len, Positions::First);
    let f32_peak = matmul_peak(1024, 10, &device)?;
    if args.dtype.dtype == Precision::Int8 {
        let training = ["adapter", "full", "lora", "ia3", "adapter-drop"];
        if let Some(what) = args.what.iter().find(|w| training.contains(&w.as_str())) {
            anyhow::bail!("--dtype int8 is for inference; '{what}' trains");
        }
    }
    // The peak of the products the frozen encoder runs on: our bf16 kernel's in bf16.
    let (peak, path) = match args.dtype.dtype {
        Precision::F32 => (f32_peak, "f32 gemm"),
        low => frozen_matmul_rate(low, 1024, 10)?,
    };

    let row = |what: &str, seconds: f64, step_flops: f64| {
        serde_json::json!({
            "what": what,
            "sequences_per_second": args.batch_size as f64 / seconds,
            "seconds_per_step": seconds,
            "gflop_per_second": step_flops / seconds / 1e9,
            "share_of_matmul_peak": step_flops / seconds / peak,
            "peak_rss_mib_so_far": peak_rss_bytes().map(|b| b as f64 / 1048576.0),
        })
    };
    // Seconds per training step (forward with dropout, backward, AdamW) of a new model.
    let time_training = |method: &Method, train_layer_norms: bool| -> Result<f64> {
        let model = AdapterModel::new(
            encoder.clone(),
            method,
            "bench",
            head.clone(),
            train_layer_norms,
            1,
            &device,
        )?;
        let mut optimizer = optimizer_for(&model)?;
        let mut mode = Mode::train(1);
        Ok(time_per_step(1, args.steps, || {
            training_step(&model, &mut optimizer, &batch, &targets, &mut mode)
        })?)
    };
    let mut rows = Vec::new();
    for what in &args.what {
        let (seconds, step_flops) = match what.as_str() {
            "inference" | "inference-all-positions" => {
                let model = AdapterModel::new(
                    encoder.clone(),
                    &Method::Head,
                    "bench",
                    head.clone(),
                    false,
                    1,
                    &device,
                )?
                .frozen();
                let last = if what == "inference" {
                    Positions::First
                } else {
                    Positions::All
                };
                let flops = forward_flops(&config, args.batch_size, args.seq_len, last);
                (
                    time_per_step(1, args.steps, || inference_step(&model, &batch, last))?,
                    flops,
                )
            }
            "prefix" => {
                let method = Method::Adapter(AdapterConfig::preset("prefix_tuning")?);
                let model = AdapterModel::new(encoder.clone(), &method, "bench", head.clone(), false, 1, &device)?
                    .frozen();
                let step = || inference_step(&model, &batch, Positions::First);
                (time_per_step(1, args.steps, step)?, flops)
            }
            "adapter" | "full" => {
                let method = if what == "full" {
                    Method::Full
                } else {
                    Method::from_name("houlsby")?
                };
                let seconds = time_training(&method, args.train_layer_norms)?;
                // Backward needs the input gradients (one forward's work) everywhere; full
                // fine-tuning also needs every weight gradient (another).
                (seconds, flops * if what == "full" { 3.0 } else { 2.0 })
            }
            "lora" | "ia3" => {
                let method = Method::Adapter(
                    AdapterConfig::preset(what)?
                        .with_overrides(&lora_options(what))
                        .map_err(anyhow::Error::msg)?,
                );
                (time_training(&method, args.train_layer_norms)?, flops * 2.0)
            }
            "lora-stack" | "lora-split" => {
                let method = Method::Adapter(
                    AdapterConfig::preset("lora")?
                        .with_overrides(&lora_options("lora"))
                        .map_err(anyhow::Error::msg)?,
                );
                let parts = ["a", "b"]
                    .iter()
                    .map(|name| {
                        AdapterModel::new(encoder.clone(), &method, name, head.clone(), false, 1, &device)
                    })
                    .collect::<adapterkit::Result<Vec<_>>>()?;
                let half = args.batch_size / 2;
                let setup = match what.as_str() {
                    "lora-stack" => Setup::parse("stack(a,b)")?,
                    _ => Setup::parse(&format!(
                        "batch_split(a,b)[{half},{}]",
                        args.batch_size - half
                    ))?,
                };
                let model = ComposedModel::new(encoder.clone(), setup, parts)?;
                (
                    time_per_step(1, args.steps, || composed_step(&model, &batch))?,
                    flops,
                )
            }
            "ops" => {
                compare_ops(&config, &args)?;
                continue;
            }
            "bf16-matmul" | "int8-matmul" => {
                // The kernel against the f32 peak measured above, on the same product.
                let precision = if what == "bf16-matmul" {
                    Precision::Bf16
                } else {
                    Precision::Int8
                };
                let (rate, path) = frozen_matmul_rate(precision, 1024, 10)?;
                let (quantised, unit) = match precision {
                    Precision::Int8 => (", activations quantised per row inside", "GOP/s"),
                    _ => ("", "GFLOP/s"),
                };
                println!(
                    "{precision} 1024^3 product ({path}, {} threads{quantised}): {:.1} {unit}, {:.0}% of the f32 peak",
                    candle_core::utils::get_num_threads(),
                    rate / 1e9,
                    100.0 * rate / f32_peak
                );
                continue;
            }
            "multitask" => {
                for (label, seconds, step_flops) in multitask(&encoder, &head, &batch, &args)? {
                    rows.push(row(&label, seconds, step_flops));
                }
                continue;
            }
            "adapter-drop" => {
                for dropped in 0..config.num_hidden_layers {
                    let config = AdapterConfig::preset("houlsby")?
                        .with_overrides(&[("leave_out".into(), format!("{:?}", (0..dropped).collect::<Vec<_>>()))])
                        .map_err(anyhow::Error::msg)?;
                    let seconds = time_training(&Method::Adapter(config), false)?;
                    // Input gradients only above the lowest adapter.
                    let layers = encoder.layers.len();
                    let backward = flops * (layers - dropped) as f64 / layers as f64;
                    rows.push(row(&format!("adapter, drop lowest {dropped}"), seconds, flops + backward));
                }
                continue;
            }
            other => anyhow::bail!(
                "unknown measurement '{other}' (inference, inference-all-positions, prefix, adapter, full, lora, ia3, lora-stack, lora-split, ops, bf16-matmul, int8-matmul, multitask, adapter-drop)"
            ),
        };
        rows.push(row(what, seconds, step_flops));
    }
    let report = serde_json::json!({
        "shape": args.shape,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "threads": candle_core::utils::get_num_threads(),
        "dtype": args.dtype.dtype.to_string(),
        "matmul_path": path,
        "matmul_peak_gflop_per_second": peak / 1e9,
        "cpu_features": cpu_features(),
        "results": rows,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} shape, batch {} x {} tokens, {} threads, {}; matmul peak ({path}) {:.1} GFLOP/s \
         (best of 10 1024^3 products); CPU: {}",
        args.shape,
        args.batch_size,
        args.seq_len,
        report["threads"],
        args.dtype.dtype,
        peak / 1e9,
        cpu_features().join(" ")
    );
    println!(
        "{:<44} {:>12} {:>10} {:>9} {:>14}",
        "what", "sequences/s", "GFLOP/s", "of peak", "peak RSS MiB"
    );
    for r in &rows {
        println!(
            "{:<44} {:>12.2} {:>10.1} {:>8.0}% {:>14.0}",
            r["what"].as_str().unwrap_or(""),
            r["sequences_per_second"].as_f64().unwrap_or(0.0),
            r["gflop_per_second"].as_f64().unwrap_or(0.0),
            100.0 * r["share_of_matmul_peak"].as_f64().unwrap_or(0.0),
            r["peak_rss_mib_so_far"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// Forward + backward of LayerNorm (`[batch x seq, hidden]`) and softmax (`[batch, heads,
/// seq, seq]`), fused kernels against the composed ops, printed as milliseconds per call.
fn compare_ops(config: &BertConfig, args: &Args) -> Result<()> {
    use adapterkit::model::ops;
    use candle_core::{Tensor, Var};
    let device = Device::Cpu;
    let mut rng = adapterkit::rng::SeededRng::new(3);
    let rows = args.batch_size * args.seq_len;
    let x = Var::from_tensor(&rng.normal_tensor((rows, config.hidden_size), 0.0, 1.0, &device)?)?;
    let w = Var::from_tensor(&rng.normal_tensor(config.hidden_size, 1.0, 0.1, &device)?)?;
    let b = Var::from_tensor(&rng.normal_tensor(config.hidden_size, 0.0, 0.1, &device)?)?;
    let scores = Var::from_tensor(&rng.normal_tensor(
        (
            args.batch_size,
            config.num_attention_heads,
            args.seq_len,
            args.seq_len,
        ),
        0.0,
        1.0,
        &device,
    )?)?;
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Result<f64> {
        Ok(1e3
            * time_per_step(1, args.steps, || {
                f()?.sum_all()?.backward()?;
                Ok(())
            })?)
    };
    let ln = (x.as_tensor(), w.as_tensor(), b.as_tensor());
    let fused_ln = time(&|| ops::layer_norm(ln.0, ln.1, ln.2, 1e-12))?;
    let composed_ln = time(&|| ops::layer_norm_composed(ln.0, ln.1, ln.2, 1e-12))?;
    let fused_sm = time(&|| ops::softmax_last_dim(scores.as_tensor()))?;
    let composed_sm = time(&|| ops::softmax_composed(scores.as_tensor()))?;
    println!("layer_norm [{rows}, {}] forward+backward: fused {fused_ln:.2} ms, composed {composed_ln:.2} ms", config.hidden_size);
    println!(
        "softmax [{}, {}, {}, {}] forward+backward: fused {fused_sm:.2} ms, composed {composed_sm:.2} ms",
        args.batch_size, config.num_attention_heads, args.seq_len, args.seq_len
    );
    Ok(())
}

/// `transformers`' `initializer_range`.
fn config_std() -> f64 {
    0.02
}

/// `--tasks` Houlsby adapters with heads on `encoder`: each alone, one after another, then all
/// in one Parallel pass with the adapters of the lowest k layers dropped, for every k. Returns
/// (label, seconds per batch, FLOPs per batch).
fn multitask(
    encoder: &BertModel,
    head: &HeadConfig,
    batch: &adapterkit::batch::Batch,
    args: &Args,
) -> Result<Vec<(String, f64, f64)>> {
    let device = Device::Cpu;
    let tasks = args.tasks;
    anyhow::ensure!(tasks > 0, "--tasks must be positive");
    let names: Vec<String> = (0..tasks).map(|i| format!("task{i}")).collect();
    let parts = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            AdapterModel::new(
                encoder.clone(),
                &Method::from_name("houlsby")?,
                name,
                head.clone(),
                false,
                i as u64,
                &device,
            )
        })
        .collect::<adapterkit::Result<Vec<_>>>()?;
    let frozen: Vec<AdapterModel> = parts.iter().map(AdapterModel::frozen).collect();
    let flops = forward_flops(
        &encoder.config,
        args.batch_size,
        args.seq_len,
        Positions::First,
    );
    let mut out = Vec::new();
    let seconds = time_per_step(1, args.steps, || {
        for part in &frozen {
            inference_step(part, batch, Positions::First)?;
        }
        Ok(())
    })?;
    out.push((
        format!("{tasks} tasks one after another"),
        seconds,
        flops * tasks as f64,
    ));
    let setup = Setup::parse(&format!("parallel({})", names.join(",")))?;
    let mut model = ComposedModel::new(encoder.clone(), setup, parts)?;
    let layers = encoder.layers.len();
    for dropped in 0..layers {
        for adapter in model.composition.adapters.values_mut() {
            adapter.set_skip_layers(&(0..dropped).collect());
        }
        let seconds = time_per_step(1, args.steps, || composed_step(&model, batch))?;
        let shared = dropped as f64 / layers as f64;
        let work = flops * (shared + tasks as f64 * (1.0 - shared));
        out.push((
            format!("{tasks} tasks in parallel, drop lowest {dropped}"),
            seconds,
            work,
        ));
    }
    Ok(out)
}
