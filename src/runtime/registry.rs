//! The node's runtimes, registered by kind: each pool's `runtime` picks where its sandboxes are
//! made, later calls for a sandbox go to the runtime that made it, and each runtime's time
//! budgets bound its creations and teardowns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{BoxFuture, Created, ExitReason, Runtime, RuntimeError};
use crate::api::PoolSpec;
use crate::api::pools::RuntimeKind;
use crate::util::MutexExt;

#[derive(Default)]
pub struct Runtimes {
    /// Each kind's runtime, or why this node has none of that kind.
    kinds: HashMap<RuntimeKind, Result<Arc<dyn Runtime>, String>>,
    /// Which kind made each live sandbox.
    owners: Mutex<HashMap<String, RuntimeKind>>,
}

impl Runtimes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a runtime, or the reason this node cannot have it (its pools then fail to create
    /// with that reason, clearly, instead of the daemon refusing to start).
    pub fn register(&mut self, kind: RuntimeKind, runtime: Result<Arc<dyn Runtime>, String>) {
        self.kinds.insert(kind, runtime);
    }

    fn get(&self, kind: RuntimeKind) -> Result<&Arc<dyn Runtime>, RuntimeError> {
        match self.kinds.get(&kind) {
            Some(Ok(runtime)) => Ok(runtime),
            Some(Err(reason)) => Err(RuntimeError::Unavailable {
                runtime: kind.as_str(),
                reason: reason.clone(),
            }),
            None => Err(RuntimeError::Unavailable {
                runtime: kind.as_str(),
                reason: "not enabled on this node".into(),
            }),
        }
    }

    fn owner(&self, id: &str) -> Option<&Arc<dyn Runtime>> {
        let kind = *self.owners.lock_or_recover().get(id)?;
        self.get(kind).ok()
    }

    fn available(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        self.kinds.values().filter_map(|r| r.as_ref().ok())
    }
}

impl Runtime for Runtimes {
    fn kind(&self) -> &'static str {
        "registry"
    }

    fn validate(&self, spec: &PoolSpec) -> Result<(), String> {
        // A kind this node lacks is not a bad spec: its creations fail with the reason.
        match self.get(spec.runtime) {
            Ok(runtime) => runtime.validate(spec),
            Err(_) => Ok(()),
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
            let budget = runtime.budgets().create;
            match tokio::time::timeout(budget, runtime.create(id, spec)).await {
                Ok(created) => created,
                Err(_) => Err(RuntimeError::OverBudget {
                    runtime: runtime.kind(),
                    operation: "creating",
                    id: id.to_string(),
                    budget,
                }),
            }
        })
    }

    fn fork<'a>(
        &'a self,
        id: &'a str,
        spec: &'a PoolSpec,
        base: &'a [std::path::PathBuf],
    ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
        Box::pin(async move {
            let runtime = self.get(spec.runtime)?;
            self.owners
                .lock_or_recover()
                .insert(id.to_string(), spec.runtime);
            let budget = runtime.budgets().create;
            match tokio::time::timeout(budget, runtime.fork(id, spec, base)).await {
                Ok(created) => created,
                Err(_) => Err(RuntimeError::OverBudget {
                    runtime: runtime.kind(),
                    operation: "forking",
                    id: id.to_string(),
                    budget,
                }),
            }
        })
    }

    fn snapshot<'a>(
        &'a self,
        id: &'a str,
        dest: &'a std::path::Path,
        limit: u64,
    ) -> BoxFuture<'a, Result<u64, RuntimeError>> {
        match self.owner(id) {
            Some(runtime) => runtime.snapshot(id, dest, limit),
            None => Box::pin(async move {
                Err(RuntimeError::Destroy {
                    id: id.to_string(),
                    reason: "no runtime holds it".into(),
                })
            }),
        }
    }

    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let result = match self.owner(id) {
                Some(runtime) => {
                    let budget = runtime.budgets().destroy;
                    match tokio::time::timeout(budget, runtime.destroy(id)).await {
                        Ok(done) => done,
                        Err(_) => Err(RuntimeError::OverBudget {
                            runtime: runtime.kind(),
                            operation: "destroying",
                            id: id.to_string(),
                            budget,
                        }),
                    }
                }
                None => Ok(()),
            };
            if result.is_ok() {
                self.owners.lock_or_recover().remove(id);
            }
            result
        })
    }

    fn exited<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ExitReason> {
        match self.owner(id) {
            Some(runtime) => runtime.exited(id),
            None => Box::pin(async { ExitReason::Destroyed }),
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
            let runtime = self.get(kind)?;
            // A paused sandbox is thawed to be vouched for (its agent must answer); the caller
            // freezes it again. Always, not only when its record says paused: a daemon that
            // died between a freeze and its record left it frozen all the same. Thawing a
            // running sandbox does nothing.
            let _ = runtime.set_paused(id, false).await;
            let created = runtime.adopt(id, kind).await?;
            self.owners.lock_or_recover().insert(id.to_string(), kind);
            Ok(created)
        })
    }

    fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>> {
        Box::pin(async move {
            let mut n = 0;
            for runtime in self.available() {
                n += runtime.reclaim().await?;
            }
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::{ApiError, ErrorCode};
    use crate::runtime::{AgentAddress, Budgets};

    /// A runtime whose creations take `delay` and which cannot pause.
    struct Slow {
        delay: Duration,
    }

    impl Runtime for Slow {
        fn kind(&self) -> &'static str {
            "slow"
        }
        fn validate(&self, spec: &PoolSpec) -> Result<(), String> {
            match spec.min_idle {
                7 => Err("seven is unlucky".into()),
                _ => Ok(()),
            }
        }
        fn budgets(&self) -> Budgets {
            Budgets {
                create: Duration::from_millis(50),
                destroy: Duration::from_millis(50),
            }
        }
        fn create<'a>(
            &'a self,
            _id: &'a str,
            _spec: &'a PoolSpec,
        ) -> BoxFuture<'a, Result<Created, RuntimeError>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                Ok(Created {
                    agent: AgentAddress::Unix("/nonexistent".into()),
                })
            })
        }
        fn destroy<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
            Box::pin(async { Ok(()) })
        }
        fn exited<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ExitReason> {
            Box::pin(std::future::pending())
        }
        fn reclaim(&self) -> BoxFuture<'_, Result<usize, RuntimeError>> {
            Box::pin(async { Ok(0) })
        }
    }

    fn registry(delay: Duration) -> Runtimes {
        let mut r = Runtimes::new();
        r.register(RuntimeKind::Process, Ok(Arc::new(Slow { delay })));
        r.register(RuntimeKind::Containerd, Err("no socket here".into()));
        r
    }

    #[tokio::test]
    async fn calls_go_to_the_kind_and_creations_keep_to_its_budget() {
        let r = registry(Duration::from_millis(10));
        let spec = PoolSpec::default();
        assert!(r.create("a", &spec).await.is_ok());
        let slow = registry(Duration::from_secs(5));
        let err = slow.create("b", &spec).await.expect_err("over budget");
        assert!(
            matches!(
                err,
                RuntimeError::OverBudget {
                    operation: "creating",
                    ..
                }
            ),
            "{err}"
        );
        let err = ApiError::from(err);
        assert_eq!(
            (err.code, err.retryable),
            (ErrorCode::SandboxUnavailable, true)
        );
    }

    #[tokio::test]
    async fn a_missing_kind_says_why_and_an_unsupported_operation_is_501() {
        let r = registry(Duration::ZERO);
        let spec = PoolSpec {
            runtime: RuntimeKind::Containerd,
            ..PoolSpec::default()
        };
        let err = r.create("c", &spec).await.expect_err("unavailable");
        assert!(err.to_string().contains("no socket here"), "{err}");
        assert_eq!(
            r.validate(&spec),
            Ok(()),
            "creation, not validation, says it"
        );
        r.create("p", &PoolSpec::default()).await.expect("process");
        let err = ApiError::from(r.set_paused("p", true).await.expect_err("no pause"));
        assert_eq!((err.code, err.status()), (ErrorCode::NotSupported, 501));
        let lucky = PoolSpec {
            min_idle: 7,
            ..PoolSpec::default()
        };
        assert_eq!(r.validate(&lucky), Err("seven is unlucky".into()));
    }
}
