//! TensorBoard event files written into the run's store.
//!
//! An object store cannot append, so every flush writes one complete event file
//! (`tensorboard/<process>/events.out.tfevents.<first step>.<wall ms>.skytrain`); TensorBoard reads
//! all event files of a directory in name order, so `skytrain tensorboard pull` plus
//! `tensorboard --logdir` shows the run. The format is TFRecord (length, masked CRC-32C, data,
//! masked CRC-32C) around `tensorflow.Event` protobufs; the few messages needed are declared here
//! with prost rather than vendoring TensorFlow's .proto files.

use crate::store::{Store, StoreError};

/// `tensorflow.Event` (only the fields skytrain writes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar (`simple_value`) or an image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<SummaryImage>,
}

/// `tensorflow.Summary.Image`: an encoded PNG.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryImage {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn push_record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

fn wall(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Events collected in memory and written as one event file per flush.
pub struct EventWriter {
    store: Store,
    dir: String,
    events: Vec<Event>,
}

impl EventWriter {
    /// Events of one process (`train`, `coordinator`, `worker-3`) under `tensorboard/<process>/`.
    pub fn new(store: &Store, process: &str) -> EventWriter {
        EventWriter { store: store.clone(), dir: format!("tensorboard/{process}"), events: Vec::new() }
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f64, time_ms: u64) {
        self.events.push(Event {
            wall_time: wall(time_ms),
            step: step as i64,
            file_version: None,
            summary: Some(Summary {
                value: vec![SummaryValue { tag: tag.into(), simple_value: Some(value as f32), image: None }],
            }),
        });
    }

    /// A PNG (e.g. a sample grid).
    pub fn image(&mut self, tag: &str, step: u64, png: &[u8], time_ms: u64) {
        let (width, height) = image::load_from_memory(png).map(|i| (i.width(), i.height())).unwrap_or((0, 0));
        let image = SummaryImage {
            height: height as i32,
            width: width as i32,
            colorspace: 3,
            encoded_image_string: png.to_vec(),
        };
        self.events.push(Event {
            wall_time: wall(time_ms),
            step: step as i64,
            file_version: None,
            summary: Some(Summary {
                value: vec![SummaryValue { tag: tag.into(), simple_value: None, image: Some(image) }],
            }),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Writes the pending events as one new event file (named by its first step, so files sort in
    /// step order and a replayed interval overwrites its own file).
    pub fn flush(&mut self) -> Result<(), StoreError> {
        use prost::Message;
        let Some(first) = self.events.first() else { return Ok(()) };
        let mut out = Vec::new();
        let header = Event {
            wall_time: first.wall_time,
            step: first.step,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        };
        push_record(&mut out, &header.encode_to_vec());
        for e in &self.events {
            push_record(&mut out, &e.encode_to_vec());
        }
        let key = format!("{}/events.out.tfevents.{:012}.skytrain", self.dir, first.step.max(0));
        self.store.put(&key, out)?;
        self.events.clear();
        Ok(())
    }
}

/// Copies every event file of the run under `out/` (for `tensorboard --logdir out`); returns
/// how many files were copied.
pub fn pull(store: &Store, out: &std::path::Path) -> Result<usize, StoreError> {
    let mut n = 0;
    for key in store.list("tensorboard")? {
        let rel = key.trim_start_matches("tensorboard/");
        let path = out.join(rel);
        std::fs::create_dir_all(path.parent().unwrap())
            .map_err(|e| StoreError::BadUrl { url: out.display().to_string(), reason: e.to_string() })?;
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, store.get(&key)?)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| StoreError::BadUrl { url: path.display().to_string(), reason: e.to_string() })?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C of "123456789" is 0xE3069283 (the standard check value); TFRecord masks it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }
}
