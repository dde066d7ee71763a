//! `/v1/pools` and `/v1/pools/{name}`: list, read, create or update, delete.

use std::sync::Arc;

use hyper::{Method, Request, Response, StatusCode};

use super::ReqBody;
use crate::api::{ApiError, PoolList, PoolSpec};
use crate::http::{self, Body, MAX_JSON_BODY};
use crate::node::manager::Manager;

pub fn list(mgr: &Manager) -> Response<Body> {
    let pools = mgr.pool_views();
    http::json(StatusCode::OK, &PoolList { pools })
}

pub async fn handle(
    mgr: &Arc<Manager>,
    name: &str,
    req: Request<ReqBody>,
) -> Result<Response<Body>, ApiError> {
    match *req.method() {
        Method::PUT => {
            let spec: PoolSpec = http::read_json(req, MAX_JSON_BODY).await?;
            mgr.put_pool(name, spec)?;
            Ok(http::json(StatusCode::OK, &mgr.pool_view(name)?))
        }
        Method::DELETE => mgr.delete_pool(name).map(|()| http::no_content()),
        _ => Ok(http::json(StatusCode::OK, &mgr.pool_view(name)?)),
    }
}
