//! The database, stream and Redis prefix a bench makes for itself on the configured servers, so that it can run
//! beside anything else, and removes when it is done.

use std::future::Future;

use tollgate_shared::config::{NamespaceArgs, ServerArgs, ServerUrl};
use tollgate_shared::connect;
use tollgate_shared::topology::Topology;
use uuid::Uuid;

pub struct BenchNamespace {
    /// The database's name.
    pub database: String,
    pub database_url: ServerUrl,
    pub names: NamespaceArgs,
    pub topology: Topology,
}

impl BenchNamespace {
    /// Fresh names (nothing is created yet).
    pub fn new(servers: &ServerArgs) -> BenchNamespace {
        let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let database = format!("tollgate_bench_{id}");
        let names = NamespaceArgs {
            stream: format!("BENCH_{id}"),
            subject_prefix: format!("bench{id}"),
            redis_prefix: format!("bench:{id}:"),
        };
        BenchNamespace {
            database_url: servers.database_url.with_database(&database),
            database,
            topology: Topology::new(&names),
            names,
        }
    }

    /// Runs `bench` on this namespace, then removes it: also when Ctrl-C or SIGTERM stops the bench midway, which
    /// drops what the bench started (its child servers are killed with their handles).
    pub async fn run<T>(
        &self,
        servers: &ServerArgs,
        bench: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let result = match crate::serve::Signals::new() {
            Ok(mut signals) => tokio::select! {
                result = bench => result,
                () = signals.next() => {
                    eprintln!("bench: stopped; removing its database, stream and Redis keys");
                    Err(anyhow::anyhow!("stopped before the end: no figures"))
                }
            },
            Err(e) => Err(e),
        };
        self.remove(servers).await;
        result
    }

    /// Removes the streams, the Redis keys (left to expire, a run's counters would linger for minutes and be
    /// expired by Redis in the middle of the next run) and the database; reports what it could not remove.
    pub async fn remove(&self, servers: &ServerArgs) {
        match connect::nats(&servers.nats_url).await {
            Ok(nats) => self.topology.delete(&async_nats::jetstream::new(nats)).await,
            Err(e) => eprintln!("bench: cannot delete stream {}: {e}", self.topology.stream),
        }
        if let Err(e) = self.topology.delete_redis_keys(&servers.redis_url).await {
            eprintln!("bench: cannot delete the Redis keys under {}: {e:#}", self.topology.redis_prefix);
        }
        let drop = async {
            let admin = connect::postgres(&servers.database_url.with_database("postgres"), 1).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database)).execute(&admin).await?;
            anyhow::Ok(())
        };
        if let Err(e) = drop.await {
            eprintln!("bench: cannot drop database {}: {e:#}", self.database);
        }
    }
}
