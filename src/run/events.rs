//! `events.jsonl`: one JSON object a line, appended by the trainer and read by
//! the dashboard and scripts. Step lines carry step/epoch/loss/lr/it_s/
//! vram_bytes/time; other lines carry `"event"` (checkpoint, sample, pause,
//! resume, done, error, ...) and their own fields.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub it_s: f64,
    pub vram_bytes: u64,
    /// Seconds since the Unix epoch.
    pub time: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Step(StepRecord),
    /// `{"event": name, ...fields}`
    Named { name: String, fields: serde_json::Map<String, serde_json::Value> },
}

pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Event {
    /// A named event with a `time` field and the given fields.
    pub fn named(name: &str, fields: serde_json::Value) -> Event {
        let mut map = match fields {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        map.insert("time".into(), serde_json::json!(now()));
        Event::Named { name: name.to_string(), fields: map }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Event::Step(s) => serde_json::to_value(s).unwrap_or_default(),
            Event::Named { name, fields } => {
                let mut m = serde_json::Map::new();
                m.insert("event".into(), serde_json::json!(name));
                m.extend(fields.clone());
                serde_json::Value::Object(m)
            }
        }
    }

    fn from_json(v: serde_json::Value) -> Option<Event> {
        let serde_json::Value::Object(mut m) = v else { return None };
        match m.remove("event") {
            Some(serde_json::Value::String(name)) => Some(Event::Named { name, fields: m }),
            _ => serde_json::from_value(serde_json::Value::Object(m)).ok().map(Event::Step),
        }
    }
}

/// Appends events; each line is written whole and flushed.
pub struct EventLog {
    path: PathBuf,
    file: File,
}

impl EventLog {
    pub fn open(run_dir: &Path) -> anyhow::Result<EventLog> {
        let path = run_dir.join("events.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(EventLog { path, file })
    }

    pub fn write(&mut self, event: &Event) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(&event.to_json())?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }

    /// Makes what was written durable (at checkpoints).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.file.sync_data().with_context(|| format!("cannot sync {}", self.path.display()))
    }
}

/// Every complete event of a run, in order. A torn last line (the trainer died
/// mid-write) and lines that are not events are skipped.
pub fn read_events(run_dir: &Path) -> anyhow::Result<Vec<Event>> {
    let path = run_dir.join("events.jsonl");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut events = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if let Some(e) = Event::from_json(v) {
                events.push(e);
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EventLog::open(dir.path()).unwrap();
        let step = StepRecord { step: 3, epoch: 1, loss: 0.25, lr: 1e-6, it_s: 2.5, vram_bytes: 7, time: 1.0 };
        log.write(&Event::Step(step.clone())).unwrap();
        log.write(&Event::named("checkpoint", serde_json::json!({"step": 3, "path": "checkpoints/step-000003"})))
            .unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(dir.path().join("events.jsonl")).unwrap();
        f.write_all(b"{\"step\": 4, \"ep").unwrap();
        let events = read_events(dir.path()).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], Event::Step(step));
        match &events[1] {
            Event::Named { name, fields } => {
                assert_eq!(name, "checkpoint");
                assert_eq!(fields["step"], 3);
                assert!(fields.contains_key("time"));
            }
            other => panic!("{other:?}"),
        }
    }
}
