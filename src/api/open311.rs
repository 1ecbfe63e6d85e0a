//! Open311 GeoReport v2 (stub; filled in by the Open311 work).

use crate::api::ApiState;
use axum::Router;

/// Routes under `/open311/v2`.
pub fn router() -> Router<ApiState> {
    Router::new()
}
