//! `events.jsonl`: one JSON object a line, appended by the trainer and read by
//! the dashboard and scripts. Step lines carry step/epoch/loss/lr/it_s/
//! vram_bytes/time; other lines carry `"event"` (checkpoint, sample, pause,
//! resume, done, error, ...) and their own fields.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
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
    /// Opens for appending. A last line torn by a killed trainer is ended first,
    /// so the next event starts a line of its own instead of being glued to the
    /// torn one (and lost with it).
    /// A log that keeps nothing: a rank other than 0 of several, which writes no run directory.
    pub fn discard() -> anyhow::Result<EventLog> {
        let path = PathBuf::from("/dev/null");
        let file = OpenOptions::new().write(true).open(&path).context("cannot open /dev/null")?;
        Ok(EventLog { path, file })
    }

    pub fn open(run_dir: &Path) -> anyhow::Result<EventLog> {
        let path = run_dir.join("events.jsonl");
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if ends_torn(&mut file).with_context(|| format!("cannot read {}", path.display()))? {
            file.write_all(b"\n").with_context(|| format!("cannot write {}", path.display()))?;
        }
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
        if self.path == Path::new("/dev/null") {
            return Ok(());
        }
        self.file.sync_data().with_context(|| format!("cannot sync {}", self.path.display()))
    }
}

/// Whether a non-empty file's last byte is not a newline.
fn ends_torn(file: &mut File) -> std::io::Result<bool> {
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// Every complete event of a run, in order. A torn line (the trainer died
/// mid-write, perhaps inside a multi-byte character of a prompt) and lines that
/// are not events are skipped.
pub fn read_events(run_dir: &Path) -> anyhow::Result<Vec<Event>> {
    let mut tail = EventTail::default();
    tail.read(run_dir)?;
    Ok(tail.events)
}

/// The events of a run read so far; each `read` parses only what was appended
/// since the last one, so a dashboard polling a run of 100 000 steps does not
/// parse 13 MB twice a second. A line still being written waits for the rest.
#[derive(Debug, Default)]
pub struct EventTail {
    /// The file read (its inode), and how far.
    inode: u64,
    offset: u64,
    partial: Vec<u8>,
    events: Vec<Event>,
}

impl EventTail {
    pub fn read(&mut self, run_dir: &Path) -> anyhow::Result<&[Event]> {
        let path = run_dir.join("events.jsonl");
        let context = || format!("cannot read {}", path.display());
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                *self = EventTail::default();
                return Ok(&self.events);
            }
            Err(e) => return Err(e).with_context(context),
        };
        // Another file (a run directory made again) is read from its start.
        let metadata = file.metadata().with_context(context)?;
        if std::os::unix::fs::MetadataExt::ino(&metadata) != self.inode || metadata.len() < self.offset {
            *self = EventTail { inode: std::os::unix::fs::MetadataExt::ino(&metadata), ..EventTail::default() };
        }
        file.seek(SeekFrom::Start(self.offset)).with_context(context)?;
        let mut bytes = std::mem::take(&mut self.partial);
        let read = file.read_to_end(&mut bytes).with_context(context)?;
        self.offset += read as u64;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.partial = bytes.split_off(complete);
        let parsed = bytes
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
            .filter_map(Event::from_json);
        self.events.extend(parsed);
        // A last line that is whole JSON lacks only its newline (written by hand).
        if let Some(event) = serde_json::from_slice(&self.partial).ok().and_then(Event::from_json) {
            self.events.push(event);
            self.partial.clear();
        }
        Ok(&self.events)
    }
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

    #[test]
    fn an_event_after_a_torn_line_is_kept_and_torn_characters_do_not_fail_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let prompt = "一张 sks 狗的照片";
        let mut log = EventLog::open(dir.path()).unwrap();
        log.write(&Event::named("sample", serde_json::json!({"prompts": [prompt]}))).unwrap();
        drop(log);
        // Killed in the middle of the second character of a prompt.
        let torn = serde_json::to_string(&serde_json::json!({"event": "sample", "prompts": [prompt]})).unwrap();
        let cut = torn.find('张').unwrap() + 1;
        let mut f = OpenOptions::new().append(true).open(dir.path().join("events.jsonl")).unwrap();
        f.write_all(&torn.as_bytes()[..cut]).unwrap();
        drop(f);
        let mut log = EventLog::open(dir.path()).unwrap();
        log.write(&Event::named("start", serde_json::json!({"resumed_from": 2}))).unwrap();
        drop(log);
        let names: Vec<String> = read_events(dir.path())
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Event::Named { name, .. } => name,
                Event::Step(_) => "step".into(),
            })
            .collect();
        assert_eq!(names, ["sample", "start"]);
    }

    #[test]
    fn a_tail_reads_what_was_appended_and_waits_for_a_line_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut tail = EventTail::default();
        assert!(tail.read(dir.path()).unwrap().is_empty());
        let mut log = EventLog::open(dir.path()).unwrap();
        log.write(&Event::named("loading", serde_json::json!({}))).unwrap();
        assert_eq!(tail.read(dir.path()).unwrap().len(), 1);
        let line = serde_json::to_string(&serde_json::json!({"event": "start", "total_steps": 4})).unwrap();
        let mut f = OpenOptions::new().append(true).open(dir.path().join("events.jsonl")).unwrap();
        f.write_all(&line.as_bytes()[..10]).unwrap();
        assert_eq!(tail.read(dir.path()).unwrap().len(), 1);
        f.write_all(&line.as_bytes()[10..]).unwrap();
        f.write_all(b"\n").unwrap();
        assert_eq!(tail.read(dir.path()).unwrap().len(), 2);
        assert_eq!(tail.read(dir.path()).unwrap().len(), 2);
        // The directory made again from scratch: its new log is read from the start.
        std::fs::remove_file(dir.path().join("events.jsonl")).unwrap();
        std::fs::write(dir.path().join("events.jsonl"), b"{\"event\": \"loading\"}").unwrap();
        assert_eq!(tail.read(dir.path()).unwrap().len(), 1);
        assert_eq!(read_events(dir.path()).unwrap().len(), 1);
    }
}
