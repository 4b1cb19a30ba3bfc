//! The two queue figures the status page leads with: jobs waiting and dead letters. Each
//! worker asks RabbitMQ itself (a passive declare on its own connection), so every replica's
//! page shows them, not only the leader's; a broker that is away or slow makes them "unknown"
//! rather than holding up or failing the page.

use std::time::Duration;

use maud::{Markup, html};
use tokio::sync::watch;

use crate::broker::Broker;

/// An operator waits for the page; RabbitMQ answers a passive declare in milliseconds when it
/// is well.
const PATIENCE: Duration = Duration::from_secs(1);

/// What RabbitMQ said; `None` is "unknown".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepths {
    /// Jobs ready for a consumer, and the queue's consumers.
    pub jobs: Option<(u32, u32)>,
    pub dead_letters: Option<u32>,
}

pub async fn measure(broker: &watch::Receiver<Option<Broker>>) -> QueueDepths {
    let broker = broker.borrow().clone();
    let Some(broker) = broker else {
        return QueueDepths::default();
    };
    let (jobs, dead_letters) = tokio::join!(
        tokio::time::timeout(PATIENCE, broker.jobs_depth()),
        tokio::time::timeout(PATIENCE, broker.dead_letter_depth()),
    );
    QueueDepths {
        jobs: jobs.ok().and_then(Result::ok),
        dead_letters: dead_letters.ok().and_then(Result::ok),
    }
}

/// `held`: the `sending` claims of the fleet, which RabbitMQ counts as delivered, not waiting.
pub fn section(depths: QueueDepths, held: i64) -> Markup {
    let unknown = html! { span.muted { "unknown" } };
    html! {
        p #queues {
            "Jobs queue: "
            @match depths.jobs {
                Some((ready, consumers)) => {
                    b #jobs-waiting { (ready) } " waiting, " (consumers) " consumer(s)"
                }
                None => { b #jobs-waiting { (unknown) } }
            }
            ", " b #jobs-held { (held) } " in hand"
            " · dead letters: "
            @match depths.dead_letters {
                Some(n) => {
                    b #dead-letters { (n) }
                    @if n > 0 { " " span.badge.warn { "look at them" } }
                }
                None => { b #dead-letters { (unknown) } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_that_did_not_answer_is_unknown_not_zero() {
        let body = section(QueueDepths::default(), 2).into_string();
        assert!(
            body.contains("<b id=\"jobs-waiting\"><span class=\"muted\">unknown</span></b>"),
            "{body}"
        );
        assert!(
            body.contains("<b id=\"dead-letters\"><span class=\"muted\">unknown</span></b>"),
            "{body}"
        );
        let body = section(
            QueueDepths {
                jobs: Some((7, 3)),
                dead_letters: Some(0),
            },
            2,
        )
        .into_string();
        assert!(
            body.contains("<b id=\"jobs-waiting\">7</b> waiting, 3 consumer(s)"),
            "{body}"
        );
        assert!(body.contains("<b id=\"dead-letters\">0</b>"), "{body}");
        assert!(!body.contains("look at them"), "{body}");
    }

    #[tokio::test]
    async fn no_connection_is_unknown_at_once() {
        let (_tx, rx) = watch::channel(None);
        assert_eq!(measure(&rx).await, QueueDepths::default());
    }
}
