//! `eval`: how often is a hit the right answer? For each `{"a", "b", "duplicate"}` line it
//! stores `a` and looks up `b` through the same cache code path that serves requests (one
//! tenant, every `a` stored first), then reports hit rate, precision, recall and F1 for a
//! range of thresholds: a table on stdout, a CSV and a PNG of precision against recall.
//!
//! A hit is **right** when the served prompt is the query's question: the same text, or one
//! the file labels a duplicate of it, directly or through other labelled duplicates (the
//! file's duplicate pairs joined into clusters). Anything else counts wrong, unlabelled pairs
//! included. **Recall** is the share of pairs labelled duplicate whose lookup was served a
//! right answer. The stricter figure of earlier reports — right only when the pair's own `a`
//! was served — is printed beside it (`own`): it counts a hit on the same question stored
//! by another pair as wrong.
//!
//! Each lookup keeps every candidate at or above `--from` with what became of it (the text
//! checks, the verifier's score), so one pass gives both curves: cosine similarity alone
//! (the first candidate that passes the checks, at each threshold) and the verifier (at each
//! cosine floor, the first candidate that passes the checks and reaches each score) — the
//! same rule the lookup serves by.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use futures::StreamExt;
use semantis_cache::scope::Scope;
use semantis_cache::{HitPath, LookupQuery, StoreCommand};
use semantis_contract::{DataplaneConfig, NO_VERIFIER, TenantConfig};
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
    /// Skip the first N pairs (with `--limit`, any slice of the file).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Measure cosine similarity alone, without the verifier the configuration would use.
    #[arg(long)]
    no_verifier: bool,
    /// Cosine floors of the verifier's curves (each a curve over verifier scores).
    #[arg(long, value_delimiter = ',', default_values_t = [0.70, 0.75, 0.80, 0.85])]
    floors: Vec<f32>,
    /// Report the curves on the lookups of the first N pairs only (the pairs the verifier was
    /// not trained on), with every pair's `a` in the store; the rest get one summary each.
    #[arg(long)]
    report_first: Option<usize>,
}

#[derive(Deserialize)]
struct Pair {
    a: String,
    b: String,
    duplicate: bool,
}

/// One candidate of a looked-up `b`, at or above the lowest threshold measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seen {
    pub similarity: f32,
    /// Its prompt is the query's question (the same, or labelled a duplicate, transitively).
    pub right: bool,
    /// It is the pair's own `a`.
    pub own: bool,
    /// It failed a text check (numbers, window) or feedback: never served.
    pub rejected: bool,
    /// The verifier's score, when it read this candidate.
    pub score: Option<f32>,
}

/// One looked-up `b`: its candidates, best first, and whether the pair is a duplicate.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub candidates: Vec<Seen>,
    pub duplicate: bool,
    /// An exact-path hit (the same text was stored): similarity 1, no verifier; whether it
    /// was the pair's own `a`.
    pub exact: Option<bool>,
}

impl Outcome {
    /// What the lookup would serve with cosine floor `floor` and, when given, verifier score
    /// `min_score`: Some((right, own)) on a hit.
    fn served(&self, floor: f32, min_score: Option<f32>) -> Option<(bool, bool)> {
        if let Some(own) = self.exact {
            return Some((true, own));
        }
        self.candidates
            .iter()
            .take_while(|c| c.similarity >= floor)
            .find(|c| !c.rejected && min_score.is_none_or(|m| c.score.is_some_and(|s| s >= m)))
            .map(|c| (c.right, c.own))
    }

    /// The alternative rule: of the candidates at or above `floor` that passed the checks,
    /// the one the verifier scored highest, when that score is at least `min_score`.
    fn served_best_scored(&self, floor: f32, min_score: f32) -> Option<(bool, bool)> {
        if let Some(own) = self.exact {
            return Some((true, own));
        }
        self.candidates
            .iter()
            .take_while(|c| c.similarity >= floor)
            .filter(|c| !c.rejected)
            .filter_map(|c| c.score.map(|s| (s, c)))
            .filter(|(s, _)| *s >= min_score)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, c)| (c.right, c.own))
    }
}

/// The file's questions grouped by its duplicate labels (union-find over case- and
/// space-folded text).
#[derive(Default)]
pub struct Clusters {
    index: HashMap<String, usize>,
    parent: Vec<usize>,
}

fn fold(text: &str) -> String {
    text.to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl Clusters {
    fn id(&mut self, text: &str) -> usize {
        let next = self.parent.len();
        let id = *self.index.entry(fold(text)).or_insert(next);
        if id == next {
            self.parent.push(id);
        }
        id
    }

    fn root(&self, mut x: usize) -> usize {
        while self.parent[x] != x {
            x = self.parent[x];
        }
        x
    }

    pub fn join(&mut self, a: &str, b: &str) {
        let (a, b) = (self.id(a), self.id(b));
        let (ra, rb) = (self.root(a), self.root(b));
        self.parent[ra] = rb;
    }

    /// Whether `served` answers `query`: the same question, or one labelled its duplicate.
    pub fn right(&self, query: &str, served: &str) -> bool {
        let (q, s) = (fold(query), fold(served));
        if q == s {
            return true;
        }
        match (self.index.get(&q), self.index.get(&s)) {
            (Some(&a), Some(&b)) => self.root(a) == self.root(b),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub threshold: f32,
    pub hit_rate: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Precision when only the pair's own `a` counts as right (and only for duplicates).
    pub precision_own: f64,
}

/// The cosine curve: at threshold t a lookup hits with its first candidate at or above t that
/// passed the checks. A hit is right when it returned the pair's own `a` and the pair is a
/// duplicate.
pub fn curve(outcomes: &[Outcome], thresholds: &[f32]) -> Vec<Row> {
    rows(outcomes, thresholds, |o, t| o.served(t, None))
}

/// The verifier's curve at cosine floor `floor`: at score s a lookup hits with its first
/// candidate at or above the floor that passed the checks and scored at least s.
pub fn verified_curve(outcomes: &[Outcome], floor: f32, scores: &[f32]) -> Vec<Row> {
    rows(outcomes, scores, |o, s| o.served(floor, Some(s)))
}

/// [`verified_curve`] under [`Outcome::served_best_scored`]: the best-scored candidate above
/// the floor rather than the nearest that passes (what serving would cost: every candidate
/// scored on every lookup).
pub fn best_scored_curve(outcomes: &[Outcome], floor: f32, scores: &[f32]) -> Vec<Row> {
    rows(outcomes, scores, |o, s| o.served_best_scored(floor, s))
}

fn rows(
    outcomes: &[Outcome],
    thresholds: &[f32],
    served: impl Fn(&Outcome, f32) -> Option<(bool, bool)>,
) -> Vec<Row> {
    let duplicates = outcomes.iter().filter(|o| o.duplicate).count() as f64;
    thresholds
        .iter()
        .map(|&t| {
            // (right, own, labelled duplicate) of every hit
            let hits: Vec<(bool, bool, bool)> = outcomes
                .iter()
                .filter_map(|o| served(o, t).map(|(right, own)| (right, own, o.duplicate)))
                .collect();
            let right = hits.iter().filter(|h| h.0).count() as f64;
            let recalled = hits.iter().filter(|h| h.0 && h.2).count() as f64;
            let own = hits.iter().filter(|h| h.1 && h.2).count() as f64;
            let n = hits.len() as f64;
            let precision = if n == 0.0 { 1.0 } else { right / n };
            let recall = if duplicates == 0.0 {
                0.0
            } else {
                recalled / duplicates
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
                precision_own: if n == 0.0 { 1.0 } else { own / n },
            }
        })
        .collect()
}

/// The pairs from `skip` on (at most `limit`), and the clusters of the whole file's labels.
fn read_pairs(
    path: &Path,
    skip: usize,
    limit: Option<usize>,
) -> anyhow::Result<(Vec<Pair>, Clusters)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("failed to open the dataset {}", path.display()))?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut pairs = Vec::new();
    let mut clusters = Clusters::default();
    let mut seen = 0;
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("failed to read line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let pair: Pair = serde_json::from_str(&line)
            .with_context(|| format!("failed to parse line {} of {}", n + 1, path.display()))?;
        if pair.duplicate {
            clusters.join(&pair.a, &pair.b);
        }
        seen += 1;
        if seen > skip && limit.is_none_or(|l| pairs.len() < l) {
            pairs.push(pair);
        }
    }
    if pairs.is_empty() {
        bail!(
            "the dataset {} holds no pairs past the first {skip}",
            path.display()
        );
    }
    Ok((pairs, clusters))
}

/// Precision against recall: the cosine curve and each verifier curve, thresholds labelled.
fn plot(curves: &[(String, Vec<Row>)], path: &Path, label: &str) -> anyhow::Result<()> {
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
        .build_cartesian_2d(0.0f64..1.0, 0.3f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("recall (share of duplicates served a right answer)")
        .y_desc("precision (share of hits that are right)")
        .draw()?;
    let goal = [(0.6, 0.3), (0.6, 0.9), (1.0, 0.9)];
    chart.draw_series(LineSeries::new(goal, BLACK.mix(0.4)))?;
    // The cosine curve in black, each verifier floor in its own colour.
    let colours = [
        BLACK,
        RED,
        RGBColor(0, 150, 0),
        BLUE,
        MAGENTA,
        RGBColor(230, 140, 0),
        CYAN,
        RGBColor(120, 60, 160),
    ];
    for (i, (name, rows)) in curves.iter().enumerate() {
        let colour = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(
                rows.iter().map(|r| (r.recall, r.precision)),
                colour,
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        chart.draw_series(
            rows.iter()
                .map(|r| Circle::new((r.recall, r.precision), 3, colour.filled())),
        )?;
        for r in rows
            .iter()
            .filter(|r| ((r.threshold * 100.0).round() as i32) % 10 == 0)
        {
            chart.draw_series(std::iter::once(Text::new(
                format!("{:.1}", r.threshold),
                (r.recall + 0.005, r.precision + 0.008),
                ("sans-serif", 12),
            )))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

fn grid(from: f32, to: f32, step: f32) -> Vec<f32> {
    let mut out = Vec::new();
    let mut t = from;
    while t <= to + 1e-6 {
        out.push((t * 1000.0).round() / 1000.0);
        t += step;
    }
    out
}

pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    if !(args.step > 0.0 && args.from <= args.to) {
        bail!("--from must not exceed --to, and --step must be positive");
    }
    if args.floors.iter().any(|f| *f < args.from) {
        bail!(
            "every --floors value must be at least --from ({})",
            args.from
        );
    }
    let (pairs, clusters) = read_pairs(&args.dataset, args.skip, args.limit)?;
    let mut cfg = semantis_dataplane::config::load_unchecked(args.config.as_deref())?;
    let data = tempfile::tempdir().context("failed to create a scratch data directory")?;
    cfg.storage.data_dir = data.path().display().to_string();
    cfg.redis = None;
    cfg.postgres = None;
    cfg.tenants = vec![TenantConfig {
        name: "eval".into(),
        // Every candidate from the lowest threshold up is kept; thresholds apply afterwards.
        min_similarity: Some(args.from),
        max_entries: Some(u64::MAX),
        max_bytes: Some(u64::MAX),
        verifier: args.no_verifier.then(|| NO_VERIFIER.to_owned()),
        // Scores are thresholded afterwards, so the verifier must read every candidate: only
        // a score of 1.0 stops it early, and that candidate is served at every threshold.
        verifier_min_score: Some(1.0),
        // Measure the verifier, not a budget: a miss for want of time would count as its fault.
        verifier_budget_ms: Some(600_000),
        ..Default::default()
    }];
    cfg.cache.default_ttl_secs = 30 * 86_400;
    // Timeouts would be deferred stores and degraded lookups, measuring the machine's load.
    cfg.embedder.timeout_ms = cfg.embedder.timeout_ms.max(600_000);
    eval_with(cfg, pairs, &clusters, &args).await
}

fn progress(len: usize, what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // Redirected to a file or a CI log: periodic lines instead of a redrawn bar.
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        let lines = bar.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(15));
            every.tick().await;
            loop {
                every.tick().await;
                if lines.is_finished() {
                    break;
                }
                tracing::info!(
                    what,
                    done = lines.position(),
                    total = len,
                    per_sec = format!("{:.1}", lines.per_sec()),
                    eta_s = lines.eta().as_secs(),
                    "eval progress"
                );
            }
        });
    }
    bar
}

async fn eval_with(
    cfg: DataplaneConfig,
    pairs: Vec<Pair>,
    clusters: &Clusters,
    args: &EvalArgs,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new().context("failed to register metrics")?);
    let built = crate::serve::build(&cfg, metrics).await?;
    let cache = built.cache;
    let tenant = cache.tenant("eval").context("the eval tenant is missing")?;
    let verifier = tenant.verification.as_ref().map(|v| v.verifier.clone());
    let scope = Scope {
        namespace: Some("eval".into()),
        ..Scope::default()
    };
    let started = std::time::Instant::now();
    let bar = progress(pairs.len(), "stores");
    let stored: Vec<anyhow::Result<()>> = futures::stream::iter(pairs.iter().enumerate())
        .map(|(i, p)| {
            let (cache, tenant, scope, bar) =
                (cache.clone(), tenant.clone(), scope.clone(), bar.clone());
            async move {
                let stored = cache
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
                    .with_context(|| format!("failed to store pair {i}"));
                bar.inc(1);
                stored
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    bar.finish();
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
    let bar = progress(pairs.len(), "lookups");
    let looked: Vec<anyhow::Result<(usize, Outcome, Option<f64>)>> =
        futures::stream::iter(pairs.iter().enumerate())
            .map(|(i, p)| {
                let (cache, tenant, scope, bar) =
                    (cache.clone(), tenant.clone(), scope.clone(), bar.clone());
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
                    bar.inc(1);
                    if let Some(reason) = out.degraded {
                        bail!("lookup {i} was degraded: {reason}");
                    }
                    let own = |e: &semantis_cache::entry::Entry| {
                        e.response.as_ref() == i.to_string().as_bytes()
                    };
                    let exact = out
                        .hit
                        .as_ref()
                        .filter(|h| h.path == HitPath::Exact)
                        .map(|h| own(&h.entry));
                    let candidates = out
                        .considered
                        .iter()
                        .map(|c| Seen {
                            similarity: c.similarity,
                            right: clusters.right(&p.b, &c.entry.prompt),
                            own: own(&c.entry),
                            rejected: c.rejection.is_some(),
                            score: c.score,
                        })
                        .collect();
                    let verify_ms = out
                        .verification
                        .filter(|v| v.best_score.is_some())
                        .map(|v| v.elapsed.as_secs_f64() * 1000.0);
                    Ok((
                        i,
                        Outcome {
                            candidates,
                            duplicate: p.duplicate,
                            exact,
                        },
                        verify_ms,
                    ))
                }
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect()
            .await;
    bar.finish();
    let mut looked = looked.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let lookup_secs = started.elapsed().as_secs_f64();
    looked.sort_by_key(|(i, _, _)| *i);
    let mut verify_ms: Vec<f64> = looked.iter().filter_map(|(_, _, ms)| *ms).collect();
    let mut outcomes: Vec<Outcome> = looked.into_iter().map(|(_, o, _)| o).collect();
    let looked_up = outcomes.len();
    let rest = match args.report_first {
        Some(n) if n < outcomes.len() => outcomes.split_off(n),
        _ => Vec::new(),
    };

    let rows = curve(&outcomes, &grid(args.from, args.to, args.step));
    let duplicates = outcomes.iter().filter(|o| o.duplicate).count();
    println!(
        "pairs {} (from pair {})  duplicates {duplicates}  embedder {} {}  verifier {}  stores {:.0}/s  lookups {:.0}/s",
        looked_up,
        args.skip,
        cfg.embedder.provider.as_str(),
        cfg.embedder.model,
        verifier.as_deref().unwrap_or("none"),
        looked_up as f64 / store_secs,
        looked_up as f64 / lookup_secs,
    );
    if !rest.is_empty() {
        println!(
            "curves below: the lookups of the first {} pairs; the store holds all {looked_up}",
            outcomes.len()
        );
    }
    let print = |title: &str, rows: &[Row]| {
        println!("{title}");
        println!("threshold  hit_rate  precision  recall      f1    own");
        for r in rows {
            println!(
                "{:>9.2}  {:>8.3}  {:>9.3}  {:>6.3}  {:>6.3}  {:>5.3}",
                r.threshold, r.hit_rate, r.precision, r.recall, r.f1, r.precision_own
            );
        }
    };
    print("cosine similarity alone (threshold = cosine):", &rows);
    let mut curves = vec![("cosine".to_owned(), rows.clone())];
    let mut csv =
        String::from("curve,floor,threshold,hit_rate,precision,recall,f1,precision_own\n");
    for r in &rows {
        csv.push_str(&format!(
            "cosine,,{:.2},{:.4},{:.4},{:.4},{:.4},{:.4}\n",
            r.threshold, r.hit_rate, r.precision, r.recall, r.f1, r.precision_own
        ));
    }
    if let Some(name) = &verifier {
        verify_ms.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            verify_ms
                .get(((verify_ms.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        println!(
            "verifier `{name}`: asked on {} lookups, waited p50 {:.1} ms, p99 {:.1} ms (queueing behind {} concurrent lookups included)",
            verify_ms.len(),
            pct(0.5),
            pct(0.99),
            args.concurrency
        );
        let scores = grid(0.05, 0.95, 0.05);
        let mut best: Option<(f32, Row)> = None;
        for &floor in &args.floors {
            let rows = verified_curve(&outcomes, floor, &scores);
            print(
                &format!(
                    "verifier `{name}` at cosine floor {floor:.2} (threshold = verifier score):"
                ),
                &rows,
            );
            for r in &rows {
                csv.push_str(&format!(
                    "{name},{floor:.2},{:.2},{:.4},{:.4},{:.4},{:.4},{:.4}\n",
                    r.threshold, r.hit_rate, r.precision, r.recall, r.f1, r.precision_own
                ));
                if r.precision >= 0.9 && best.as_ref().is_none_or(|(_, b)| r.recall > b.recall) {
                    best = Some((floor, r.clone()));
                }
            }
            curves.push((format!("{name}, cosine ≥ {floor:.2}"), rows));
        }
        for &floor in &args.floors {
            let rows = best_scored_curve(&outcomes, floor, &[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]);
            println!(
                "the best-scored candidate instead of the nearest that passes, cosine floor {floor:.2}:"
            );
            for r in &rows {
                println!(
                    "  score ≥ {:.2}: hit rate {:.3}, precision {:.3}, recall {:.3}",
                    r.threshold, r.hit_rate, r.precision, r.recall
                );
            }
        }
        match best {
            Some((floor, r)) => println!(
                "best with precision ≥ 0.90: cosine floor {floor:.2}, score {:.2}: precision {:.3}, recall {:.3}, hit rate {:.3}",
                r.threshold, r.precision, r.recall, r.hit_rate
            ),
            None => println!("no point of the verifier's curves reaches precision 0.90"),
        }
    }
    if !rest.is_empty() {
        let summary = |what: String, rows: Vec<Row>| {
            for r in rows {
                println!(
                    "  {what} {:.2}: hit rate {:.3}, precision {:.3}, recall {:.3}, own {:.3}",
                    r.threshold, r.hit_rate, r.precision, r.recall, r.precision_own
                );
            }
        };
        println!(
            "the other {} pairs' lookups (the verifier may have trained on them):",
            rest.len()
        );
        summary("cosine ≥".into(), curve(&rest, &[0.85, 0.90]));
        if let Some(name) = &verifier {
            for &floor in &args.floors {
                summary(
                    format!("{name}, cosine ≥ {floor:.2}, score ≥"),
                    verified_curve(&rest, floor, &[0.5, 0.9]),
                );
            }
        }
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, csv).with_context(|| format!("failed to write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let label = format!(
            "{} (pairs {}..{})",
            args.dataset
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            args.skip,
            args.skip + outcomes.len()
        );
        plot(&curves, path, &label)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_scored_rule_serves_the_highest_score_above_the_floor() {
        let seen = |similarity, right, score| Seen {
            similarity,
            right,
            own: right,
            rejected: false,
            score: Some(score),
        };
        let o = Outcome {
            candidates: vec![
                seen(0.95, false, 0.6),
                seen(0.90, true, 0.9),
                seen(0.70, false, 0.99),
            ],
            duplicate: true,
            exact: None,
        };
        assert_eq!(o.served(0.85, Some(0.5)), Some((false, false)));
        assert_eq!(o.served_best_scored(0.85, 0.5), Some((true, true)));
        assert_eq!(o.served_best_scored(0.85, 0.95), None);
        assert_eq!(o.served_best_scored(0.60, 0.95), Some((false, false)));
    }

    #[test]
    fn the_curve_counts_right_hits_only() {
        let o = |similarity, own, duplicate| Outcome {
            candidates: vec![Seen {
                similarity,
                right: own && duplicate,
                own,
                rejected: false,
                score: None,
            }],
            duplicate,
            exact: None,
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

    #[test]
    fn the_verifier_curve_serves_the_first_candidate_that_passes_checks_and_score() {
        let seen = |similarity, own, rejected, score| Seen {
            similarity,
            right: own,
            own,
            rejected,
            score: Some(score),
        };
        let outcomes = [
            // The nearest is another `a` the verifier doubts; the own `a` it trusts.
            Outcome {
                candidates: vec![seen(0.95, false, false, 0.2), seen(0.85, true, false, 0.9)],
                duplicate: true,
                exact: None,
            },
            // The nearest failed the number check: never served, however it scored.
            Outcome {
                candidates: vec![seen(0.97, false, true, 0.99)],
                duplicate: false,
                exact: None,
            },
            // An exact hit needs no verifier.
            Outcome {
                candidates: vec![],
                duplicate: true,
                exact: Some(true),
            },
        ];
        let rows = verified_curve(&outcomes, 0.8, &[0.5, 0.1]);
        assert_eq!((rows[0].hit_rate, rows[0].precision), (2.0 / 3.0, 1.0));
        assert_eq!(rows[0].recall, 1.0);
        // At 0.1 the nearer, wrong candidate is served first.
        assert_eq!(rows[1].precision, 0.5);
        // Above the own `a`'s similarity only the exact hit is left.
        let rows = verified_curve(&outcomes, 0.9, &[0.5]);
        assert_eq!((rows[0].hit_rate, rows[0].recall), (1.0 / 3.0, 0.5));
        // Cosine alone serves the nearest that passed the checks.
        let rows = curve(&outcomes, &[0.8]);
        assert_eq!(rows[0].precision, 0.5);
    }

    #[test]
    fn labelled_duplicates_join_into_clusters_and_nothing_else_counts_right() {
        let mut c = Clusters::default();
        c.join(
            "How do I learn Rust?",
            "What is the best way to learn Rust?",
        );
        c.join(
            "What is the best way to learn Rust?",
            "Learning Rust: where to start?",
        );
        assert!(c.right("how do I  learn rust?", "Learning Rust: where to start?"));
        assert!(
            c.right("Unseen question", "unseen  QUESTION"),
            "the same text"
        );
        assert!(!c.right("How do I learn Rust?", "How do I learn Go?"));
        assert!(!c.right("Unseen question", "How do I learn Rust?"));
    }
}
