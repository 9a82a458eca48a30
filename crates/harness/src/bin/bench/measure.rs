//! Load generation and the statistics of a measurement: closed-loop HTTP
//! load, percentiles, and the median of repeated rounds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};

use crate::report::Row;

/// Closed-loop load: `conns` keep-alive HTTP/1.1 connections, each sending
/// the next request as soon as the last was answered. Returns requests per
/// second and every request's latency (ms).
pub(crate) async fn closed_loop(urls: Arc<Vec<String>>, conns: usize) -> Result<(f64, Vec<f64>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (urls, next, errors) = (urls.clone(), next.clone(), errors.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .http1_only()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap_or_default();
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(u) = urls.get(i) else { break };
                    let t = Instant::now();
                    match client.post(u).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(urls.len());
    for t in tasks {
        all.extend(t.await?);
    }
    let rate = urls.len() as f64 / start.elapsed().as_secs_f64();
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        bail!("{e} of {} requests failed", urls.len());
    }
    Ok((rate, all))
}

/// The round with the median ratio, its notes listing every round's ratio.
pub(crate) fn median_round<T>(mut rounds: Vec<(Row, T)>) -> Option<(Row, T)> {
    rounds.sort_by(|a, b| {
        a.0.ratio
            .unwrap_or(f64::NAN)
            .total_cmp(&b.0.ratio.unwrap_or(f64::NAN))
    });
    let ratios: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.0.ratio.unwrap_or(f64::NAN)))
        .collect();
    let n = rounds.len();
    let (mut row, extra) = rounds.into_iter().nth(n / 2)?;
    let rounds_note = format!("median of {n} rounds (ratios {})", ratios.join(", "));
    row.notes = if row.notes.is_empty() {
        rounds_note
    } else {
        format!("{rounds_note}; {}", row.notes)
    };
    Some((row, extra))
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Which of the bench's triggers an event is about: its AMQP message id is
/// the promise id (`<prefix>-<n>`, then `/progress/<seq>` for progress).
pub(crate) fn event_index(message_id: Option<&str>) -> Option<usize> {
    message_id?
        .split('/')
        .next()?
        .rsplit('-')
        .next()?
        .parse()
        .ok()
}

/// How many of the spawned requests did not succeed.
pub(crate) async fn failures(sends: Vec<tokio::task::JoinHandle<bool>>) -> usize {
    let mut failed = 0;
    for s in sends {
        if !s.await.unwrap_or(false) {
            failed += 1;
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_trigger() {
        assert_eq!(event_index(Some("bench1-b4-0000042")), Some(42));
        assert_eq!(event_index(Some("bench1-b4-0000042/progress/7")), Some(42));
        assert_eq!(event_index(Some("no-number-here")), None);
        assert_eq!(event_index(None), None);
    }
}
