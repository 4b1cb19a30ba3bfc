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

/// The lock's key within the database ("smsw", "lead"), in the two-part key space, which the
/// single-key per-number locks (`hashtext`) cannot reach. Advisory locks are per database, so
/// test databases on one server do not share a leader.
const LOCK_KEY: (i32, i32) = (0x736d_7377, 0x6c65_6164);
/// A check that takes longer than this counts as a lost connection.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Leadership {
    pool: PgPool,
    /// How often the leader checks in; its session is ended by Postgres itself after a few
    /// checks' silence, so a leader whose host vanished does not hold the lock for hours.
    every: Duration,
    conn: Option<PgConnection>,
    leading: bool,
}

impl Leadership {
    pub fn new(pool: PgPool, every: Duration) -> Self {
        Self {
            pool,
            every,
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
            let mut conn = PgConnection::connect_with(&options).await?;
            let silence = i64::try_from((self.every * 5).max(Duration::from_secs(5)).as_millis())
                .unwrap_or(i64::MAX);
            // Postgres 14 and later; on older servers the lock waits for TCP to notice.
            if let Err(e) = sqlx::query("SELECT set_config('idle_session_timeout', $1, false)")
                .bind(silence.to_string())
                .execute(&mut conn)
                .await
            {
                tracing::debug!(error = %e, "idle_session_timeout not set on the leader's session");
            }
            self.conn = Some(conn);
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
            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1, $2)")
                .bind(LOCK_KEY.0)
                .bind(LOCK_KEY.1)
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
