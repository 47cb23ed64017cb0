//! A small but real training loop on encrypted data: logistic regression in plain Rust on
//! batches the loader decrypts, with a checkpoint of the loader state mid-epoch and a resume.
//!
//! ```text
//! cargo run --release --example train_loop                 # generates and converts a dataset
//! CIPHERSHARD_KEY_FILE=master.key cargo run --release --example train_loop -- DATASET_DIR
//! ```
//! A given dataset needs an F32 column `x` ([rows, d]) and an F32 column `y` ([rows], 0 or 1).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ciphershard::cipher::Backend;
use ciphershard::format::{ConvertInput, ConvertOptions, Dtype, convert};
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions, LoaderState, RowSource};
use ciphershard::{MasterKey, Result};

const FEATURES: usize = 32;

/// A linearly separable-ish synthetic problem: y = [w·x + noise > 0].
fn make_dataset(dir: &Path, rows: u64) -> Result<MasterKey> {
    let key = MasterKey::generate()?;
    let mut rng = ciphershard::cipher::conformance::SplitMix(2024);
    let mut unit = || (rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0;
    let w: Vec<f32> = (0..FEATURES).map(|_| unit() * 2.0).collect();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        let row: Vec<f32> = (0..FEATURES).map(|_| unit()).collect();
        let z: f32 = row.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + unit() * 0.5;
        x.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        y.extend_from_slice(&(if z > 0.0 { 1.0f32 } else { 0.0 }).to_le_bytes());
    }
    let inputs = [
        ConvertInput::InMemory {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![rows, FEATURES as u64],
            data: x,
        },
        ConvertInput::InMemory {
            name: "y".into(),
            dtype: Dtype::F32,
            shape: vec![rows],
            data: y,
        },
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: 64 << 10,
        shard_size: Some(2 << 20),
        ..Default::default()
    };
    convert(&inputs, dir, &opts, &mut |_, _| {})?;
    Ok(key)
}

struct Model {
    w: Vec<f32>,
    b: f32,
}

impl Model {
    /// One SGD step on a batch; returns the batch's mean log-loss before the step.
    fn step(&mut self, x: &[f32], y: &[f32], lr: f32) -> f32 {
        let d = self.w.len();
        let n = y.len();
        let (mut gw, mut gb, mut loss) = (vec![0f32; d], 0f32, 0f32);
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            let z: f32 = xi.iter().zip(&self.w).map(|(a, b)| a * b).sum::<f32>() + self.b;
            let p = 1.0 / (1.0 + (-z).exp());
            loss -= y[i] * p.max(1e-7).ln() + (1.0 - y[i]) * (1.0 - p).max(1e-7).ln();
            let g = p - y[i];
            for (gj, xj) in gw.iter_mut().zip(xi) {
                *gj += g * xj;
            }
            gb += g;
        }
        for (wj, gj) in self.w.iter_mut().zip(&gw) {
            *wj -= lr * gj / n as f32;
        }
        self.b -= lr * gb / n as f32;
        loss / n as f32
    }
}

/// Trains until `stop_after` batches (or the end); returns the state to checkpoint.
fn train(loader: &mut Loader, model: &mut Model, stop_after: Option<u64>) -> Result<LoaderState> {
    let (mut epoch, mut sum, mut n, mut done) = (u64::MAX, 0f32, 0u32, 0u64);
    while stop_after.is_none_or(|s| done < s) {
        let Some(batch) = loader.next() else { break };
        let batch = batch?;
        if batch.epoch() != epoch {
            if n > 0 {
                println!("epoch {epoch}: mean loss {:.4}", sum / n as f32);
            }
            (epoch, sum, n) = (batch.epoch(), 0.0, 0);
        }
        let x = batch
            .tensor("x")
            .and_then(|t| t.as_slice::<f32>())
            .expect("F32 column x");
        let y = batch
            .tensor("y")
            .and_then(|t| t.as_slice::<f32>())
            .expect("F32 column y");
        sum += model.step(x, y, 0.5);
        n += 1;
        done += 1;
    }
    if n > 0 {
        println!(
            "epoch {epoch}: mean loss {:.4} (over the {n} batches of this run)",
            sum / n as f32
        );
    }
    Ok(loader.state())
}

fn main() -> Result<()> {
    let arg = std::env::args_os().nth(1).map(PathBuf::from);
    let tmp;
    let (dir, key) = match arg {
        Some(dir) => {
            let var = "CIPHERSHARD_KEY_FILE";
            (dir, MasterKey::from_env_file(var)?)
        }
        None => {
            tmp = std::env::temp_dir().join(format!("ciphershard-train-{}", std::process::id()));
            let key = make_dataset(&tmp, 20_000)?;
            println!(
                "converted 20000 synthetic rows into {} (encrypted)",
                tmp.display()
            );
            (tmp.clone(), key)
        }
    };
    let source: Arc<dyn RowSource> = FormatSource::open(&dir, &key, Backend::Cpu)?;
    let opts = LoaderOptions {
        batch_size: 128,
        seed: 7,
        epochs: 4,
        threads: 2,
        ..Default::default()
    };
    let mut model = Model {
        w: vec![0.0; source.columns()[0].row_shape.iter().product::<u64>() as usize],
        b: 0.0,
    };

    // Train 1.5 epochs, checkpoint the loader state (a small JSON) and the model, "crash".
    let mut loader = Loader::new(source.clone(), &opts)?;
    let stop = loader.batches_per_epoch() * 3 / 2;
    let state = train(&mut loader, &mut model, Some(stop))?;
    let checkpoint = serde_json::to_string(&state).expect("state serializes");
    drop(loader);
    println!("checkpoint after {stop} batches: {checkpoint}");

    // Resume exactly where it stopped and finish the remaining epochs.
    let state: LoaderState = serde_json::from_str(&checkpoint).expect("state parses");
    let mut loader = Loader::resume(source, &opts, &state)?;
    train(&mut loader, &mut model, None)?;
    let st = loader.stats();
    println!(
        "resumed run: {} batches, read amplification {:.2}, decrypt {:.2} GB/s per thread, consumer waited {:.1} ms",
        st.batches,
        st.read_amplification,
        st.decrypt.gbps,
        st.consumer_wait_ns as f64 / 1e6
    );
    if std::env::args_os().nth(1).is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
