//! `eval`: how often is a hit the right answer? For each `{"a", "b", "duplicate"}` line it
//! stores `a` and looks up `b` through the same cache code path that serves requests (one
//! tenant, every `a` stored first), then reports hit rate, precision, recall and F1 for a
//! range of thresholds: a table on stdout, a CSV and a PNG of precision against hit rate.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use futures::StreamExt;
use semantis_cache::scope::Scope;
use semantis_cache::{LookupQuery, StoreCommand};
use semantis_contract::{DataplaneConfig, TenantConfig};
use semantis_dataplane::metrics::Metrics;
use serde::Deserialize;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// JSON lines `{"a": …, "b": …, "duplicate": bool}`, optionally gzip-compressed (.gz).
    #[arg(long)]
    dataset: PathBuf,
    /// Dataplane configuration for the embedder (default: the local model).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Use only the first N pairs.
    #[arg(long)]
    limit: Option<usize>,
    /// Lowest threshold of the curve.
    #[arg(long, default_value_t = 0.70)]
    from: f32,
    /// Highest threshold of the curve.
    #[arg(long, default_value_t = 0.98)]
    to: f32,
    #[arg(long, default_value_t = 0.01)]
    step: f32,
    /// Write the curve as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw precision against hit rate into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Stores and lookups in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

#[derive(Deserialize)]
struct Pair {
    a: String,
    b: String,
    duplicate: bool,
}

/// One looked-up `b`: the best candidate's similarity and whether it was the pair's own `a`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub similarity: f32,
    pub own: bool,
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub threshold: f32,
    pub hit_rate: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// The curve: at threshold t a lookup hits when its best similarity ≥ t; a hit is right when
/// it returned the pair's own `a` and the pair is a duplicate.
pub fn curve(outcomes: &[Outcome], thresholds: &[f32]) -> Vec<Row> {
    let duplicates = outcomes.iter().filter(|o| o.duplicate).count() as f64;
    thresholds
        .iter()
        .map(|&t| {
            let hits: Vec<&Outcome> = outcomes.iter().filter(|o| o.similarity >= t).collect();
            let right = hits.iter().filter(|o| o.own && o.duplicate).count() as f64;
            let n = hits.len() as f64;
            let precision = if n == 0.0 { 1.0 } else { right / n };
            let recall = if duplicates == 0.0 {
                0.0
            } else {
                right / duplicates
            };
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            Row {
                threshold: t,
                hit_rate: n / outcomes.len().max(1) as f64,
                precision,
                recall,
                f1,
            }
        })
        .collect()
}

fn read_pairs(path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Pair>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("failed to open the dataset {}", path.display()))?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut pairs = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        if limit.is_some_and(|l| pairs.len() >= l) {
            break;
        }
        let line = line.with_context(|| format!("failed to read line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let pair: Pair = serde_json::from_str(&line)
            .with_context(|| format!("failed to parse line {} of {}", n + 1, path.display()))?;
        pairs.push(pair);
    }
    if pairs.is_empty() {
        bail!("the dataset {} holds no pairs", path.display());
    }
    Ok(pairs)
}

fn plot(rows: &[Row], path: &Path, label: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let font = std::fs::read(FONT).with_context(|| {
        format!("failed to read the plot font {FONT} (Debian fonts-dejavu-core)")
    })?;
    // plotters keeps registered fonts for the process's lifetime.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("failed to register the plot font"))?;
    let root = BitMapBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Semantis eval: {label}"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0f64..1.0, 0.0f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("hit rate (share of lookups that hit)")
        .y_desc("precision (share of hits that are right)")
        .draw()?;
    chart.draw_series(LineSeries::new(
        rows.iter().map(|r| (r.hit_rate, r.precision)),
        &BLUE,
    ))?;
    chart.draw_series(
        rows.iter()
            .map(|r| Circle::new((r.hit_rate, r.precision), 3, BLUE.filled())),
    )?;
    for r in rows
        .iter()
        .filter(|r| ((r.threshold * 100.0).round() as i32) % 5 == 0)
    {
        chart.draw_series(std::iter::once(Text::new(
            format!("{:.2}", r.threshold),
            (r.hit_rate + 0.01, r.precision + 0.01),
            ("sans-serif", 14),
        )))?;
    }
    root.present()
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    if !(args.step > 0.0 && args.from <= args.to) {
        bail!("--from must not exceed --to, and --step must be positive");
    }
    let pairs = read_pairs(&args.dataset, args.limit)?;
    let mut cfg = semantis_dataplane::config::load_unchecked(args.config.as_deref())?;
    let data = tempfile::tempdir().context("failed to create a scratch data directory")?;
    cfg.storage.data_dir = data.path().display().to_string();
    cfg.redis = None;
    cfg.postgres = None;
    cfg.tenants = vec![TenantConfig {
        name: "eval".into(),
        // Every lookup returns its best candidate; thresholds are applied afterwards.
        min_similarity: Some(-1.0),
        max_entries: Some(u64::MAX),
        ..Default::default()
    }];
    cfg.cache.default_ttl_secs = 30 * 86_400;
    eval_with(cfg, pairs, &args).await
}

async fn eval_with(cfg: DataplaneConfig, pairs: Vec<Pair>, args: &EvalArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new().context("failed to register metrics")?);
    let built = crate::serve::build(&cfg, metrics).await?;
    let cache = built.cache;
    let tenant = cache.tenant("eval").context("the eval tenant is missing")?;
    let scope = Scope {
        namespace: Some("eval".into()),
        ..Scope::default()
    };
    let started = std::time::Instant::now();
    let stored: Vec<anyhow::Result<()>> = futures::stream::iter(pairs.iter().enumerate())
        .map(|(i, p)| {
            let (cache, tenant, scope) = (cache.clone(), tenant.clone(), scope.clone());
            async move {
                cache
                    .store(
                        &tenant,
                        StoreCommand {
                            prompt: p.a.clone(),
                            vector: None,
                            response: i.to_string().into_bytes(),
                            scope,
                            ttl_secs: None,
                            prompt_tokens: 0,
                            completion_tokens: 0,
                            cost_usd: 0.0,
                            metadata: None,
                        },
                    )
                    .await
                    .map(|_| ())
                    .with_context(|| format!("failed to store pair {i}"))
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    stored.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    // Stores whose embedding timed out were accepted for later; embed them now, or the
    // lookups would be measured against an incomplete index.
    let mut deferred = 0;
    loop {
        let moved = cache
            .embed_pending(256)
            .await
            .context("failed to embed the stores deferred while the embedder was slow")?;
        if moved == 0 {
            break;
        }
        deferred += moved;
    }
    if deferred > 0 {
        tracing::info!(deferred, "embedded stores that had timed out");
    }
    let store_secs = started.elapsed().as_secs_f64();
    cache
        .flush_all()
        .await
        .context("failed to flush the stored entries")?;
    cache.maintain().await;

    let started = std::time::Instant::now();
    let looked: Vec<anyhow::Result<Outcome>> = futures::stream::iter(pairs.iter().enumerate())
        .map(|(i, p)| {
            let (cache, tenant, scope) = (cache.clone(), tenant.clone(), scope.clone());
            async move {
                let out = cache
                    .lookup(
                        &tenant,
                        LookupQuery {
                            prompt: Some(p.b.clone()),
                            vector: None,
                            scope,
                            min_similarity: None,
                            request_id: format!("eval-{i}"),
                        },
                    )
                    .await
                    .with_context(|| format!("failed to look up pair {i}"))?;
                if let Some(reason) = out.degraded {
                    bail!("lookup {i} was degraded: {reason}");
                }
                let (similarity, own) = match &out.hit {
                    Some(h) => (
                        h.similarity,
                        h.entry.response.as_ref() == i.to_string().as_bytes(),
                    ),
                    None => (-1.0, false),
                };
                Ok(Outcome {
                    similarity,
                    own,
                    duplicate: p.duplicate,
                })
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let outcomes = looked.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let lookup_secs = started.elapsed().as_secs_f64();

    let mut thresholds = Vec::new();
    let mut t = args.from;
    while t <= args.to + 1e-6 {
        thresholds.push((t * 1000.0).round() / 1000.0);
        t += args.step;
    }
    let rows = curve(&outcomes, &thresholds);
    let duplicates = outcomes.iter().filter(|o| o.duplicate).count();
    println!(
        "pairs {}  duplicates {duplicates}  embedder {} {}  stores {:.0}/s  lookups {:.0}/s",
        outcomes.len(),
        cfg.embedder.provider.as_str(),
        cfg.embedder.model,
        outcomes.len() as f64 / store_secs,
        outcomes.len() as f64 / lookup_secs,
    );
    println!("threshold  hit_rate  precision  recall      f1");
    for r in &rows {
        println!(
            "{:>9.2}  {:>8.3}  {:>9.3}  {:>6.3}  {:>6.3}",
            r.threshold, r.hit_rate, r.precision, r.recall, r.f1
        );
    }
    if let Some(path) = &args.csv {
        let mut text = String::from("threshold,hit_rate,precision,recall,f1\n");
        for r in &rows {
            text.push_str(&format!(
                "{:.2},{:.4},{:.4},{:.4},{:.4}\n",
                r.threshold, r.hit_rate, r.precision, r.recall, r.f1
            ));
        }
        std::fs::write(path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let label = format!(
            "{} ({} pairs)",
            args.dataset
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            outcomes.len()
        );
        plot(&rows, path, &label)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_counts_right_hits_only() {
        let o = |similarity, own, duplicate| Outcome {
            similarity,
            own,
            duplicate,
        };
        let outcomes = [
            o(0.99, true, true),  // right
            o(0.95, true, false), // own a, but not a duplicate: wrong
            o(0.92, false, true), // another a: wrong
            o(0.80, true, true),  // right only at low thresholds
        ];
        let rows = curve(&outcomes, &[0.9, 0.75, 0.995]);
        assert_eq!(rows[0].hit_rate, 0.75);
        assert!((rows[0].precision - 1.0 / 3.0).abs() < 1e-9);
        assert!((rows[0].recall - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(rows[1].hit_rate, 1.0);
        assert!((rows[1].precision - 0.5).abs() < 1e-9);
        assert!((rows[1].recall - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(
            (rows[2].hit_rate, rows[2].precision, rows[2].recall),
            (0.0, 1.0, 0.0)
        );
    }
}
