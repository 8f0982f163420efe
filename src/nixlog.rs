//! Nix's `--log-format internal-json`, read back: lines for people (messages, activity
//! texts, build log lines) and the build count (`N/M built`) for the progress display.
//! Nix 2.8 and current Nix emit the same events for `nix-store --realise`.

use serde_json::Value;

/// Nix's activity type for "the builds of this command".
const ACT_BUILDS: u64 = 104;
/// Result types: a line of a build's log; progress (done, expected, running, failed).
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_PROGRESS: u64 = 105;
/// Messages and activities up to "info" are worth a line.
const LEVEL_INFO: u64 = 3;

/// What one line of Nix's output means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A line for people.
    Text(String),
    /// Builds done and expected so far.
    Builds {
        /// Finished builds.
        done: u64,
        /// All builds of the command.
        expected: u64,
    },
    /// Nothing to show.
    Nothing,
}

/// Follows one command's `internal-json` output (activity ids matter across lines).
#[derive(Debug, Default)]
pub struct Reader {
    builds_activity: Option<u64>,
}

impl Reader {
    /// What `line` means; lines that are not `@nix {…}` are text as they are.
    pub fn read(&mut self, line: &str) -> Event {
        let Some(json) = line.strip_prefix("@nix ") else {
            return Event::Text(line.to_string());
        };
        let Ok(event) = serde_json::from_str::<Value>(json) else {
            return Event::Text(line.to_string());
        };
        let number = |key: &str| event.get(key).and_then(Value::as_u64);
        let text = |key: &str| event.get(key).and_then(Value::as_str).unwrap_or_default();
        match text("action") {
            // Nix colours its messages even here.
            "msg" if number("level").unwrap_or(0) <= LEVEL_INFO => {
                Event::Text(crate::progress::strip_control_lines(text("msg")))
            }
            "start" => {
                if number("type") == Some(ACT_BUILDS) {
                    self.builds_activity = number("id");
                }
                let shown = text("text");
                if !shown.is_empty() && number("level").unwrap_or(0) <= LEVEL_INFO {
                    Event::Text(shown.to_string())
                } else {
                    Event::Nothing
                }
            }
            "result" => {
                let fields = event.get("fields").and_then(Value::as_array);
                let field = |i: usize| fields.and_then(|f| f.get(i));
                match number("type") {
                    Some(RES_BUILD_LOG_LINE) => field(0)
                        .and_then(Value::as_str)
                        .map_or(Event::Nothing, |l| Event::Text(l.to_string())),
                    Some(RES_PROGRESS) if number("id") == self.builds_activity => {
                        match (
                            field(0).and_then(Value::as_u64),
                            field(1).and_then(Value::as_u64),
                        ) {
                            (Some(done), Some(expected)) => Event::Builds { done, expected },
                            _ => Event::Nothing,
                        }
                    }
                    _ => Event::Nothing,
                }
            }
            _ => Event::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as Nix 2.8 printed them for `nix-store --realise --log-format internal-json`.
    #[test]
    fn reads_what_nix_prints() {
        let mut reader = Reader::default();
        let lines = [
            r#"@nix {"action":"msg","level":3,"msg":"these 4 derivations will be built:"}"#,
            r#"@nix {"action":"start","id":66,"level":0,"text":"","type":104}"#,
            r#"@nix {"action":"start","id":67,"level":0,"text":"","type":103}"#,
            r#"@nix {"action":"result","fields":[0,0,0,0],"id":67,"type":105}"#,
            r#"@nix {"action":"result","fields":[2,4,1,0],"id":66,"type":105}"#,
            r#"@nix {"action":"start","fields":["/nix/store/x.drv","",1,1],"id":69,"level":3,"text":"building '/nix/store/x.drv'","type":105}"#,
            r#"@nix {"action":"result","fields":["fixture build fails on purpose"],"id":69,"type":101}"#,
            r#"@nix {"action":"msg","column":null,"level":0,"msg":"\u001b[31;1merror:\u001b[0m builder for 'x' failed"}"#,
            r#"@nix {"action":"msg","level":5,"msg":"debug noise"}"#,
            "/tmp/clan-r-build0/system",
        ];
        let events: Vec<Event> = lines.iter().map(|l| reader.read(l)).collect();
        assert_eq!(
            events,
            vec![
                Event::Text("these 4 derivations will be built:".into()),
                Event::Nothing,
                Event::Nothing,
                Event::Nothing,
                Event::Builds {
                    done: 2,
                    expected: 4
                },
                Event::Text("building '/nix/store/x.drv'".into()),
                Event::Text("fixture build fails on purpose".into()),
                Event::Text("error: builder for 'x' failed".into()),
                Event::Nothing,
                Event::Text("/tmp/clan-r-build0/system".into()),
            ]
        );
    }
}
