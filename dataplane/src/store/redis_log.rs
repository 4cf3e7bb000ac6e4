//! Cluster mode's write-ahead log: one Redis Stream per table, shared by every replica.
//!
//! A store is acknowledged once XADD returns, which with `appendonly yes` and
//! `appendfsync always` means it is on Redis's disk. Every replica follows the stream into its
//! own tail, so a store made through one replica is searchable on all of them within the
//! follower's lag (milliseconds). One replica at a time holds the table's flush lease and is
//! the only one that mutates the LanceDB table.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{Client, Value};

use super::BackendError;
use super::wal::WalRecord;

/// A position in the log: a stream id `ms-seq` as `ms << 64 | seq`.
pub type Pos = u128;

pub fn parse_stream_id(id: &str) -> Option<Pos> {
    let (ms, seq) = id.split_once('-')?;
    Some((u128::from(ms.parse::<u64>().ok()?) << 64) | u128::from(seq.parse::<u64>().ok()?))
}

pub fn format_stream_id(pos: Pos) -> String {
    format!("{}-{}", pos >> 64, pos & u128::from(u64::MAX))
}

fn redis_err(action: &'static str, key: &str, e: redis::RedisError) -> BackendError {
    BackendError::Redis {
        action,
        key: key.to_owned(),
        source: Box::new(e),
    }
}

/// Renew the lease if we hold it, take it if nobody does. The holder is stored as
/// `replica#epoch`; every take increments the table's epoch counter, so a leader's epoch is
/// larger than every earlier leader's (the write fence compares them). Returns the epoch
/// held, or 0.
const LEASE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder then
  local replica, epoch = string.match(holder, '^(.*)#(%d+)$')
  if replica == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(epoch)
  end
  return 0
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '#' .. epoch, 'PX', ARGV[2])
return epoch";

/// Append with the next sequence number of the log, in the same step: a follower that finds
/// a number missing knows records were trimmed before it read them.
const APPEND_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], '*', 'r', ARGV[1], 'n', n)";

const RELEASE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and string.match(holder, '^(.*)#%d+$') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Make the next lease take's epoch larger than `ARGV[1]` (an epoch a fence holds that the
/// counter no longer reaches: Redis lost its data).
const RAISE_EPOCH_SCRIPT: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0";

pub struct RedisLog {
    client: Client,
    conn: ConnectionManager,
    key: String,
    seq_key: String,
    lease_key: String,
    epoch_key: String,
    replica: String,
}

/// The follower connection's reply deadline: a blocking read's longest wait plus room for
/// the reply to travel.
pub const FOLLOWER_REPLY_DEADLINE: Duration = Duration::from_millis(2500);

/// Connection settings shared by the log and the hot layer: deadlines so an outage turns
/// into errors, never into hung requests. A down Redis refuses at once; the reply deadline
/// leaves room for an `appendfsync always` fsync on a busy disk (500 ms was seen to trip).
pub async fn connect(client: &Client) -> Result<ConnectionManager, BackendError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(2000)))
        .set_number_of_retries(1);
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| redis_err("connect to", "redis", e))
}

impl RedisLog {
    pub fn new(client: Client, conn: ConnectionManager, table: &str, replica: &str) -> Self {
        Self {
            client,
            conn,
            key: format!("semantis:{{{table}}}:log"),
            seq_key: format!("semantis:{{{table}}}:log-seq"),
            lease_key: format!("semantis:{{{table}}}:flush-lease"),
            epoch_key: format!("semantis:{{{table}}}:flush-epoch"),
            replica: replica.to_owned(),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub async fn append(&self, record: &WalRecord) -> Result<Pos, BackendError> {
        let body = serde_json::to_vec(record).map_err(|e| BackendError::Decode {
            table: self.key.clone(),
            reason: format!("failed to encode a log record: {e}"),
        })?;
        let id: String = redis::Script::new(APPEND_SCRIPT)
            .key(&self.key)
            .key(&self.seq_key)
            .arg(body)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| redis_err("append to", &self.key, e))?;
        parse_stream_id(&id).ok_or_else(|| BackendError::Decode {
            table: self.key.clone(),
            reason: format!("Redis returned the stream id `{id}`"),
        })
    }

    /// The id of the newest record, if any.
    pub async fn last_pos(&self) -> Result<Option<Pos>, BackendError> {
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(&self.key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| redis_err("read the end of", &self.key, e))?;
        let mut batch = LogBatch::default();
        parse_entries(reply, &self.key, &mut batch);
        Ok(batch.last)
    }

    /// Whether every record up to `upto` reached the table: only `flushed` markers (and
    /// records nobody can decode) remain at or before it.
    pub async fn flushed_through(&self, upto: Pos) -> Result<bool, BackendError> {
        const LOOK: usize = 16;
        let reply: Value = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg("-")
            .arg(format_stream_id(upto))
            .arg("COUNT")
            .arg(LOOK)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| redis_err("read the start of", &self.key, e))?;
        let mut batch = LogBatch::default();
        parse_entries(reply, &self.key, &mut batch);
        Ok(batch.records.len() + batch.undecodable < LOOK
            && batch
                .records
                .iter()
                .all(|(_, r)| matches!(r, WalRecord::Flushed { .. })))
    }

    /// A connection of its own for blocking reads (they would stall a shared one). Its reply
    /// deadline must outlast the longest `BLOCK` it sends: with the client's default (500 ms,
    /// the same as the follower's block) an empty read raced its own deadline and failed as
    /// "timed out" whenever the network added a millisecond, as it does between pods.
    pub async fn follower_connection(&self) -> Result<MultiplexedConnection, BackendError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(FOLLOWER_REPLY_DEADLINE));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| redis_err("connect the follower of", &self.key, e))
    }

    /// Records after `after`, waiting up to `block` (less than [`FOLLOWER_REPLY_DEADLINE`])
    /// for the first one.
    pub async fn read_after(
        &self,
        conn: &mut MultiplexedConnection,
        after: Pos,
        block: Duration,
    ) -> Result<LogBatch, BackendError> {
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(4096)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(1000))
            .arg("STREAMS")
            .arg(&self.key)
            .arg(format_stream_id(after))
            .query_async(conn)
            .await
            .map_err(|e| redis_err("follow", &self.key, e))?;
        // [[key, [[id, [field, value]], …]]] or nil on timeout
        let Value::Array(streams) = reply else {
            return Ok(LogBatch::default());
        };
        let mut out = LogBatch::default();
        for stream in streams {
            if let Value::Array(mut parts) = stream
                && parts.len() == 2
            {
                parse_entries(parts.remove(1), &self.key, &mut out);
            }
        }
        Ok(out)
    }

    /// Remove records before `pos` (they are in the table now).
    pub async fn trim_before(&self, pos: Pos) -> Result<(), BackendError> {
        let _: i64 = redis::cmd("XTRIM")
            .arg(&self.key)
            .arg("MINID")
            .arg(format_stream_id(pos))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| redis_err("trim", &self.key, e))?;
        Ok(())
    }

    /// Take or renew the table's flush lease; the epoch of this replica's lease while it
    /// holds it.
    pub async fn lead(&self, ttl: Duration) -> Result<Option<u64>, BackendError> {
        let epoch: u64 = redis::Script::new(LEASE_SCRIPT)
            .key(&self.lease_key)
            .key(&self.epoch_key)
            .arg(&self.replica)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(10_000))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| redis_err("take the flush lease", &self.lease_key, e))?;
        Ok((epoch > 0).then_some(epoch))
    }

    /// Raise the epoch counter to at least `epoch`.
    pub async fn raise_epoch(&self, epoch: u64) -> Result<(), BackendError> {
        let _: i64 = redis::Script::new(RAISE_EPOCH_SCRIPT)
            .key(&self.epoch_key)
            .arg(epoch)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| redis_err("raise the flush epoch", &self.epoch_key, e))?;
        Ok(())
    }

    pub async fn release(&self) -> Result<(), BackendError> {
        let _: i64 = redis::Script::new(RELEASE_SCRIPT)
            .key(&self.lease_key)
            .arg(&self.replica)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| redis_err("release the flush lease", &self.lease_key, e))?;
        Ok(())
    }
}

/// What one read of the stream returned.
#[derive(Debug, Default)]
pub struct LogBatch {
    pub records: Vec<(Pos, WalRecord)>,
    /// The newest position read, decodable or not: where the next read starts.
    pub last: Option<Pos>,
    /// Records that could not be decoded (skipped, logged).
    pub undecodable: usize,
    /// The sequence numbers of the first and the last record read (`None` for a record
    /// appended without one, by a version before them or by hand).
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

impl LogBatch {
    /// True when records between `prev` (the sequence number of the last record read before
    /// this batch) and this batch are gone: the log was trimmed before this reader saw them.
    /// Trims only cut the front of the stream, so one read is contiguous in itself.
    pub fn follows_a_gap(&self, prev: Option<u64>) -> bool {
        matches!((prev, self.first_seq), (Some(p), Some(f)) if f != p.wrapping_add(1))
    }
}

/// `[[id, [field, value, …]], …]` → records. A record this version cannot decode is skipped
/// with a log line (and counted): stopping at it would stop the follower for good.
fn parse_entries(reply: Value, key: &str, out: &mut LogBatch) {
    let Value::Array(entries) = reply else {
        return;
    };
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            continue;
        };
        if parts.len() != 2 {
            continue;
        }
        let fields = parts.pop();
        let id = parts.pop();
        let pos = match id {
            Some(Value::BulkString(b)) => std::str::from_utf8(&b).ok().and_then(parse_stream_id),
            Some(Value::SimpleString(s)) => parse_stream_id(&s),
            _ => None,
        };
        let Some(pos) = pos else { continue };
        let first = out.last.is_none();
        out.last = Some(out.last.map_or(pos, |l| l.max(pos)));
        let Some(Value::Array(fields)) = fields else {
            out.undecodable += 1;
            if first {
                out.first_seq = None;
            }
            out.last_seq = None;
            continue;
        };
        let mut it = fields.into_iter();
        let mut found = false;
        let mut seq = None;
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            if matches!(&f, Value::BulkString(b) if b.as_slice() == b"n") {
                seq = match &v {
                    Value::BulkString(b) => {
                        std::str::from_utf8(b).ok().and_then(|s| s.parse().ok())
                    }
                    _ => None,
                };
                continue;
            }
            let is_record = matches!(&f, Value::BulkString(b) if b.as_slice() == b"r");
            if let (true, Value::BulkString(bytes)) = (is_record, v) {
                match serde_json::from_slice::<WalRecord>(&bytes) {
                    Ok(record) => {
                        out.records.push((pos, record));
                        found = true;
                    }
                    Err(e) => tracing::error!(
                        log = key,
                        record = %format_stream_id(pos),
                        error = %e,
                        "failed to decode a log record; skipping it"
                    ),
                }
            }
        }
        if first {
            out.first_seq = seq;
        }
        out.last_seq = seq;
        if !found {
            out.undecodable += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_undecodable_record_is_skipped_and_reading_moves_past_it() {
        let entry = |id: &str, body: &[u8]| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"r".to_vec()),
                    Value::BulkString(body.to_vec()),
                ]),
            ])
        };
        let reply = Value::Array(vec![
            entry("5-0", br#"{"op":"delete","ids":["a"]}"#),
            entry("6-0", b"{not json"),
            entry("7-0", br#"{"op":"some_future_op"}"#),
        ]);
        let mut batch = LogBatch::default();
        parse_entries(reply, "log", &mut batch);
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.undecodable, 2);
        assert_eq!(batch.last, parse_stream_id("7-0"));
    }

    #[test]
    fn a_missing_sequence_number_before_a_batch_is_a_gap() {
        let entry = |id: &str, n: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"r".to_vec()),
                    Value::BulkString(br#"{"op":"delete","ids":["a"]}"#.to_vec()),
                    Value::BulkString(b"n".to_vec()),
                    Value::BulkString(n.as_bytes().to_vec()),
                ]),
            ])
        };
        let mut batch = LogBatch::default();
        parse_entries(
            Value::Array(vec![entry("8-0", "12"), entry("9-0", "13")]),
            "log",
            &mut batch,
        );
        assert_eq!((batch.first_seq, batch.last_seq), (Some(12), Some(13)));
        assert!(!batch.follows_a_gap(Some(11)));
        assert!(
            batch.follows_a_gap(Some(10)),
            "record 11 was trimmed unread"
        );
        assert!(
            batch.follows_a_gap(Some(40)),
            "the counter went back: resynchronise"
        );
        assert!(
            !batch.follows_a_gap(None),
            "nothing read before: nothing to compare"
        );
    }

    #[test]
    fn stream_ids_round_trip_and_order() {
        let a = parse_stream_id("1700000000000-0").expect("a");
        let b = parse_stream_id("1700000000000-1").expect("b");
        let c = parse_stream_id("1700000000001-0").expect("c");
        assert!(a < b && b < c);
        assert_eq!(format_stream_id(b), "1700000000000-1");
        assert_eq!(parse_stream_id("nope"), None);
    }
}
