//! Coalescing: concurrent identical cache misses (same tenant, scope and normalised prompt)
//! make one upstream call. The first request through [`Flights::join`] leads; the others
//! follow, waiting (bounded) for the leader's answer. A leader that ends without an answer
//! (the upstream failed, the stream was cut, the answer came from the cache) releases its
//! followers to go their own way. An answered flight stays joinable until its store has
//! landed ([`Landing`]), so a request arriving in between is answered from it rather than
//! missing a cache that is about to hold the answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

#[derive(Clone, Debug)]
enum State {
    Pending,
    Answered(Arc<Value>),
    Released,
}

type Map = Mutex<HashMap<String, (u64, watch::Receiver<State>)>>;

#[derive(Default)]
pub struct Flights {
    map: Arc<Map>,
    next: std::sync::atomic::AtomicU64,
}

pub enum Joined {
    Leader(Leader),
    Follower(Follower),
}

pub struct Leader {
    key: String,
    id: u64,
    tx: watch::Sender<State>,
    map: Arc<Map>,
    answered: bool,
}

pub struct Follower {
    rx: watch::Receiver<State>,
}

/// Keeps an answered flight joinable until dropped (once the answer is stored).
pub struct Landing {
    key: String,
    id: u64,
    map: Arc<Map>,
}

impl Flights {
    pub fn join(&self, key: String) -> Joined {
        let mut map = self.map.lock();
        if let Some((_, rx)) = map.get(&key)
            && !matches!(&*rx.borrow(), State::Released)
        {
            return Joined::Follower(Follower { rx: rx.clone() });
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(State::Pending);
        map.insert(key.clone(), (id, rx));
        Joined::Leader(Leader {
            key,
            id,
            tx,
            map: self.map.clone(),
            answered: false,
        })
    }

    /// Flights in the map (leaders in progress and answers not yet stored).
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn remove(map: &Map, key: &str, id: u64) {
    let mut map = map.lock();
    if map.get(key).is_some_and(|(i, _)| *i == id) {
        map.remove(key);
    }
}

impl Leader {
    /// Hand the answer to every follower; the flight stays joinable until the [`Landing`] is
    /// dropped.
    pub fn answer(mut self, completion: Arc<Value>) -> Landing {
        self.answered = true;
        self.tx.send_replace(State::Answered(completion));
        Landing {
            key: self.key.clone(),
            id: self.id,
            map: self.map.clone(),
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.answered {
            remove(&self.map, &self.key, self.id);
            self.tx.send_replace(State::Released);
        }
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        remove(&self.map, &self.key, self.id);
    }
}

impl Follower {
    /// The leader's answer, or `None` when the leader ended without one or `wait` ran out.
    pub async fn wait(mut self, wait: Duration) -> Option<Arc<Value>> {
        let outcome =
            tokio::time::timeout(wait, self.rx.wait_for(|s| !matches!(s, State::Pending))).await;
        match outcome {
            Ok(Ok(state)) => match &*state {
                State::Answered(v) => Some(v.clone()),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_answer_until_it_has_landed() {
        let flights = Flights::default();
        let Joined::Leader(leader) = flights.join("k".into()) else {
            panic!("the first request leads");
        };
        let Joined::Follower(f) = flights.join("k".into()) else {
            panic!("the second follows");
        };
        let landing = leader.answer(Arc::new(serde_json::json!({"a": 1})));
        assert_eq!(
            f.wait(Duration::from_secs(5)).await.as_deref(),
            Some(&serde_json::json!({"a": 1}))
        );
        let Joined::Follower(late) = flights.join("k".into()) else {
            panic!("an answered flight is joinable until it lands");
        };
        assert!(late.wait(Duration::from_secs(5)).await.is_some());
        drop(landing);
        assert!(flights.is_empty());
        assert!(matches!(flights.join("k".into()), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn a_leader_without_an_answer_releases_its_followers() {
        let flights = Flights::default();
        let leader = flights.join("k".into());
        let Joined::Follower(f) = flights.join("k".into()) else {
            panic!("follows");
        };
        drop(leader);
        assert!(f.wait(Duration::from_secs(5)).await.is_none());
        assert!(flights.is_empty());
    }
}
