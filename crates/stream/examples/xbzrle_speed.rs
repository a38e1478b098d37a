//! Encoder and decoder speed of XBZRLE on page patterns a guest produces, in MB of pages
//! per second: `cargo run --release -p vmigrate-stream --example xbzrle_speed`. The
//! encoder is timed as `encode` runs it on this CPU (wide scans where the CPU has them)
//! and with the portable word scans.
//!
//! Patterns: a page unchanged; one byte changed; a tag rewritten in every 64-bit word
//! (one byte in eight changed, as the lab workload does between passes); 64 scattered
//! 16-byte writes; a page rewritten whole (overflow).

use std::hint::black_box;
use std::time::Instant;

use vmigrate_stream::xbzrle::{decode, encode, encode_portable, Encoded};

const PS: usize = 4096;
const PAGES: usize = 256;

fn pattern(name: &str, old: &[u8], seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let mut new = old.to_vec();
    match name {
        "unchanged" => {}
        "one byte" => new[(next() as usize) % PS] ^= 0x5A,
        "word tags" => {
            for w in new.chunks_exact_mut(8) {
                w[4] = w[4].wrapping_add(1);
            }
        }
        "scattered" => {
            for _ in 0..64 {
                let at = (next() as usize) % (PS - 16);
                for b in &mut new[at..at + 16] {
                    *b = b.wrapping_add(1 + (next() % 200) as u8);
                }
            }
        }
        "whole page" => {
            for b in &mut new {
                *b = b.wrapping_add(1);
            }
        }
        _ => unreachable!(),
    }
    new
}

fn main() {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let olds: Vec<Vec<u8>> = (0..PAGES)
        .map(|i| (0..PS).map(|j| ((i * 31 + j * 7) % 251) as u8).collect())
        .collect();
    println!(
        "{:<12} {:>12} {:>14} {:>12} {:>14}",
        "pattern", "encode MB/s", "portable MB/s", "decode MB/s", "encoded bytes"
    );
    for name in [
        "unchanged",
        "one byte",
        "word tags",
        "scattered",
        "whole page",
    ] {
        let news: Vec<Vec<u8>> = olds.iter().map(|o| pattern(name, o, &mut seed)).collect();
        let mut out = vec![0u8; PS];
        let rounds = 400;
        let t = Instant::now();
        let mut total = 0usize;
        for _ in 0..rounds {
            for (o, n) in olds.iter().zip(&news) {
                if let Encoded::Len(k) = encode(black_box(o), black_box(n), &mut out) {
                    total += k;
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..rounds {
            for (o, n) in olds.iter().zip(&news) {
                if let Encoded::Len(k) = encode_portable(black_box(o), black_box(n), &mut out) {
                    total += k;
                }
            }
        }
        let psecs = t.elapsed().as_secs_f64();
        let bytes = (rounds * PAGES * PS) as f64;
        let encoded = match encode(&olds[0], &news[0], &mut out) {
            Encoded::Len(k) => format!("{k}"),
            other => format!("{other:?}"),
        };
        // Decoding: the encodings of every page, applied to copies of the old pages.
        let encodings: Vec<Option<Vec<u8>>> = olds
            .iter()
            .zip(&news)
            .map(|(o, n)| match encode(o, n, &mut out) {
                Encoded::Len(k) => Some(out[..k].to_vec()),
                _ => None,
            })
            .collect();
        let mut page = vec![0u8; PS];
        let t = Instant::now();
        let mut decoded = 0usize;
        for _ in 0..rounds {
            for (o, e) in olds.iter().zip(&encodings) {
                if let Some(e) = e {
                    page.copy_from_slice(o);
                    decoded += decode(black_box(e), &mut page).unwrap();
                }
            }
        }
        let dsecs = t.elapsed().as_secs_f64();
        let dec = if encodings.iter().any(Option::is_some) {
            format!("{:.0}", bytes / dsecs / 1e6)
        } else {
            "-".into()
        };
        black_box((total, decoded));
        println!(
            "{name:<12} {:>12.0} {:>14.0} {dec:>12} {encoded:>14}",
            bytes / secs / 1e6,
            bytes / psecs / 1e6
        );
    }
}
