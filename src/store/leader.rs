//! Which worker of the fleet does the duties that must happen once: polling receipts,
//! reconciling unknown sends, sweeping stale claims and the result outbox.
//!
//! The leader holds a session-level advisory lock on a connection of its own (outside the pool,
//! so the lock lives exactly as long as that connection). Postgres releases the lock when the
//! session ends, so a leader that dies or loses its database hands over by itself; a leader
//! that cannot reach its connection stops leading at its next check. The duties are written
//! as conditional updates, so the short overlap a network split can cause repeats no effect.

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};

/// The lock's key within the database ("smsw"); advisory locks are per database, so test
/// databases on one server do not share a leader.
const LOCK_KEY: i64 = 0x736d_7377;
/// A check that takes longer than this counts as a lost connection.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Leadership {
    pool: PgPool,
    conn: Option<PgConnection>,
    leading: bool,
}

impl Leadership {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            conn: None,
            leading: false,
        }
    }

    /// Confirms or tries to take the leadership; says whether this worker leads now.
    pub async fn check(&mut self) -> bool {
        let was = self.leading;
        self.leading = matches!(
            tokio::time::timeout(CHECK_TIMEOUT, self.try_check()).await,
            Ok(Ok(true))
        );
        if !self.leading {
            if was {
                tracing::warn!("lost the fleet leadership; another worker takes the duties");
            }
            // A failed check may leave the session (and the lock) in doubt: end it.
            if self.conn.is_some() && was {
                self.conn = None;
            }
        } else if !was {
            tracing::info!("leading the fleet: receipts, reconciliation and sweeps run here");
        }
        self.leading
    }

    async fn try_check(&mut self) -> Result<bool, sqlx::Error> {
        if self.conn.is_none() {
            let options = self.pool.connect_options();
            self.conn = Some(PgConnection::connect_with(&options).await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(false);
        };
        let result = if self.leading {
            sqlx::query("SELECT 1")
                .execute(&mut *conn)
                .await
                .map(|_| true)
        } else {
            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(LOCK_KEY)
                .fetch_one(&mut *conn)
                .await
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Gives the leadership up at once (on shutdown), so a worker that stays takes over
    /// without waiting for this process to exit.
    pub async fn resign(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = tokio::time::timeout(CHECK_TIMEOUT, conn.close()).await;
        }
        self.leading = false;
    }
}
