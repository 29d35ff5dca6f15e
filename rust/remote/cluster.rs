//! Where a key lives in a Redis/Valkey cluster: the slot of a key
//! (CRC16/XMODEM of its hash tag, modulo 16384) and the map of slot ranges
//! to masters that `CLUSTER SLOTS` reports. The tier refreshes the map when
//! a node answers MOVED or ASK and retries those keys once (never more: a
//! cluster that keeps moving keys costs hits, not time).

use redis::Value;

const SLOTS: u16 = 16384;

/// CRC16/XMODEM (polynomial 0x1021, initial 0), as Redis Cluster uses it.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of `key`: only the part inside the first `{...}` counts
/// when it is not empty.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// Masters by slot range.
#[derive(Default, Clone)]
pub(crate) struct SlotMap {
    /// (first slot, last slot, master as (host, port)), sorted by first slot.
    ranges: Vec<(u16, u16, (String, u16))>,
}

impl SlotMap {
    /// From a `CLUSTER SLOTS` reply; a node reported without a host (an
    /// empty string or "?") is reached at `seed_host`, the host that answered.
    pub(crate) fn parse(v: &Value, seed_host: &str) -> Result<SlotMap, String> {
        let bad = || "CLUSTER SLOTS answered something that is not a slot map".to_string();
        let Value::Array(items) = v else {
            return Err(bad());
        };
        let mut ranges = Vec::new();
        for item in items {
            let Value::Array(f) = item else {
                return Err(bad());
            };
            let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(master))) =
                (f.first(), f.get(1), f.get(2))
            else {
                return Err(bad());
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return Err(bad()),
            };
            let host = if host.is_empty() || host == "?" {
                seed_host.to_string()
            } else {
                host
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err(bad());
            };
            let (Ok(a), Ok(b), Ok(port)) =
                (u16::try_from(*a), u16::try_from(*b), u16::try_from(*port))
            else {
                return Err(bad());
            };
            ranges.push((a, b, (host, port)));
        }
        if ranges.is_empty() {
            return Err("the cluster serves no slots yet".into());
        }
        ranges.sort_by_key(|r| r.0);
        Ok(SlotMap { ranges })
    }

    /// The master serving `slot` (None: no node serves it).
    pub(crate) fn master(&self, slot: u16) -> Option<&(String, u16)> {
        let i = self.ranges.partition_point(|r| r.0 <= slot);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (slot <= r.1).then_some(&r.2)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Every master, each once, in slot order.
    pub(crate) fn masters(&self) -> Vec<(String, u16)> {
        let mut out: Vec<(String, u16)> = Vec::new();
        for r in &self.ranges {
            if !out.contains(&r.2) {
                out.push(r.2.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis_cluster() {
        // The values in the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}")); // empty tag: whole key
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
    }

    #[test]
    fn slot_map_routes_and_refuses_garbage() {
        let node = |h: &str, p: i64| Value::Array(vec![Value::BulkString(h.into()), Value::Int(p)]);
        let v = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("", 7000)]),
        ]);
        let m = SlotMap::parse(&v, "seed").unwrap();
        assert_eq!(m.master(0), Some(&("seed".to_string(), 7000)));
        assert_eq!(m.master(5461), Some(&("10.0.0.2".to_string(), 7001)));
        assert_eq!(m.master(10923), None);
        assert!(SlotMap::parse(&Value::Int(1), "s").is_err());
        assert!(SlotMap::parse(&Value::Array(vec![]), "s").is_err());
    }
}
