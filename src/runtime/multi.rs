//! Several runtimes behind one: each pool's `runtime` picks where its sandboxes are made, and
//! later calls for a sandbox go to the runtime that made it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{BoxFuture, Created, Runtime, RuntimeError};
use crate::api::PoolSpec;
use crate::api::pools::RuntimeKind;
use crate::util::MutexExt;

pub struct Runtimes {
    process: Arc<dyn Runtime>,
    /// The containerd runtime, or why there is none on this node.
    containerd: Result<Arc<dyn Runtime>, String>,
    owners: Mutex<HashMap<String, RuntimeKind>>,
}

impl Runtimes {
    pub fn new(process: Arc<dyn Runtime>, containerd: Result<Arc<dyn Runtime>, String>) -> Self {
        Self {
            process,
            containerd,
            owners: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, kind: RuntimeKind) -> Result<&Arc<dyn Runtime>, RuntimeError> {
        match kind {
            RuntimeKind::Process => Ok(&self.process),
            RuntimeKind::Containerd => {
                self.containerd
                    .as_ref()
                    .map_err(|reason| RuntimeError::Unsupported {
                        runtime: "containerd",
                        reason: reason.clone(),
                    })
            }
        }
    }

    fn owner(&self, id: &str) -> Option<&Arc<dyn Runtime>> {
        let kind = *self.owners.lock_or_recover().get(id)?;
        self.get(kind).ok()
    }
}

impl Runtime for Runtimes {
    fn kind(&self) -> &'static str {
        if self.containerd.is_ok() {
            "process+containerd"
        } else {
            "process"
        }
    }

    fn create<'a>(
        &'a self,
        id: &'a str,
        spec: &'a PoolSpec,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(async move {
            let runtime = self.get(spec.runtime)?;
            self.owners
                .lock_or_recover()
                .insert(id.to_string(), spec.runtime);
            runtime.create(id, spec).await
        })
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let result = match self.owner(id) {
                Some(runtime) => runtime.destroy(id).await,
                None => Ok(()),
            };
            if result.is_ok() {
                self.owners.lock_or_recover().remove(id);
            }
            result
        })
    }

    fn exited<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        match self.owner(id) {
            Some(runtime) => runtime.exited(id),
            None => Box::pin(async {}),
        }
    }

    fn set_paused<'a>(
        &'a self,
        id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        match self.owner(id) {
            Some(runtime) => runtime.set_paused(id, paused),
            None => Box::pin(async { Ok(()) }),
        }
    }

    fn adopt<'a>(
        &'a self,
        id: &'a str,
        kind: RuntimeKind,
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(async move {
            let created = self.get(kind)?.adopt(id, kind).await?;
            self.owners.lock_or_recover().insert(id.to_string(), kind);
            Ok(created)
        })
    }

    fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>> {
        Box::pin(async move {
            let mut n = self.process.reclaim().await?;
            if let Ok(containerd) = &self.containerd {
                n += containerd.reclaim().await?;
            }
            Ok(n)
        })
    }
}
