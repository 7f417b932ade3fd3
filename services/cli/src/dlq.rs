//! `tollgate dlq list|replay`.

use async_nats::jetstream;

use tollgate_shared::topology::Topology;
use tollgate_worker::dlq::{self, Selection};

use crate::cli::DlqCommand;
use crate::output::{print, table};

pub async fn dlq(nats: async_nats::Client, topology: &Topology, json: bool, command: DlqCommand) -> anyhow::Result<()> {
    let js = jetstream::new(nats);
    match command {
        DlqCommand::List => {
            let letters = dlq::list(&js, topology).await?;
            print(json, &letters, |letters| {
                let rows = letters
                    .iter()
                    .map(|l| vec![l.sequence.to_string(), l.time.to_rfc3339(), l.size.to_string(), l.reason.clone()])
                    .collect();
                table(&["SEQ", "TIME", "BYTES", "REASON"], rows)
            })
        }
        DlqCommand::Replay { seq, all } => {
            let selection = match seq {
                Some(seq) if !all => Selection::One(seq),
                _ => Selection::All,
            };
            let replayed = dlq::replay(&js, topology, selection).await?;
            print(json, &replayed, |replayed| format!("replayed {} dead letter(s)", replayed.len()))
        }
    }
}
