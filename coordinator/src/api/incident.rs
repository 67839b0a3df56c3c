//! Incident API (`drctl incident ...`): the DRP's `activate-incident --level P0` and the
//! incident's timeline. Writes go through Raft like every mutation (so they are audited);
//! reads pass the read guard. The operations listed with an incident are computed from the
//! operations table at read time (created between opening and resolution), so an incident
//! never needs updating when a failover or restore starts.

use dr_proto::pb;
use tonic::{Request, Response, Status};
use tracing::info;

use super::auth::{Permission, authorize};
use super::error::{ApiError, ApiResult};
use crate::Ctx;
use crate::state::incidents::{Incident, IncidentCommand, Level, id_text, parse_id};
use crate::state::{self, Command, State};

pub struct IncidentApi {
    ctx: std::sync::Arc<Ctx>,
}

impl IncidentApi {
    pub fn new(ctx: std::sync::Arc<Ctx>) -> Self {
        IncidentApi { ctx }
    }

    async fn commit(&self, origin: &str, cmd: IncidentCommand) -> ApiResult<()> {
        match super::propose(&self.ctx, origin, Command::Incident(cmd)).await? {
            state::Response::Refused { refusal } => Err(ApiError::Refused(refusal)),
            _ => Ok(()),
        }
    }

    fn info_of(&self, id: u64) -> ApiResult<pb::IncidentInfo> {
        self.ctx
            .node
            .read(|s| s.incidents.incidents.get(&id).map(|i| info(s, i)))
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no incident {}; see `drctl incident list`",
                    id_text(id)
                ))
            })
    }
}

fn level(s: &str) -> Result<Level, Status> {
    Level::parse(s).map_err(Status::invalid_argument)
}

/// The wire form, with the operations created while the incident was open.
pub fn info(s: &State, i: &Incident) -> pb::IncidentInfo {
    let until = if i.is_open() {
        i64::MAX
    } else {
        i.resolved_at_unix_ms
    };
    let operations = s
        .ops
        .operations
        .values()
        .filter(|o| o.created_at_unix_ms >= i.opened_at_unix_ms && o.created_at_unix_ms <= until)
        .map(|o| {
            let pb = o.to_info();
            format!("{} {} {}", pb.id, pb.kind, pb.state)
        })
        .collect();
    pb::IncidentInfo {
        id: id_text(i.id),
        level: i.level.as_str().to_owned(),
        title: i.title.clone(),
        state: if i.is_open() { "open" } else { "resolved" }.to_owned(),
        opened_by: i.opened_by.clone(),
        opened_at_unix_ms: i.opened_at_unix_ms,
        respond_by_unix_ms: i.respond_by_unix_ms(),
        escalation: i.level.escalation().to_owned(),
        resolved_at_unix_ms: i.resolved_at_unix_ms,
        duration_ms: if i.is_open() {
            0
        } else {
            i.resolved_at_unix_ms - i.opened_at_unix_ms
        },
        events: i
            .events
            .iter()
            .map(|e| pb::IncidentEvent {
                at_unix_ms: e.at_unix_ms,
                by: e.by.clone(),
                kind: e.kind.clone(),
                text: e.text.clone(),
            })
            .collect(),
        operations,
    }
}

#[tonic::async_trait]
impl pb::incident_service_server::IncidentService for IncidentApi {
    async fn open_incident(
        &self,
        req: Request<pb::OpenIncidentRequest>,
    ) -> Result<Response<pb::IncidentInfo>, Status> {
        let origin = authorize(&self.ctx, &req, "OpenIncident", Permission::Act)?;
        let r = req.into_inner();
        let lvl = level(&r.level)?;
        let request_id = if r.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            r.request_id
        };
        self.commit(
            &origin.to_string(),
            IncidentCommand::Open {
                level: lvl,
                title: r.title,
                summary: r.summary,
                request_id: request_id.clone(),
            },
        )
        .await
        .map_err(Status::from)?;
        let id = self
            .ctx
            .node
            .read(|s| s.incidents.by_request(&request_id).map(|i| i.id))
            .ok_or_else(|| Status::internal("the incident was committed but is not in the state yet; see `drctl incident list`"))?;
        info!(identity = %origin, incident = %id_text(id), level = lvl.as_str(), "incident opened");
        Ok(Response::new(self.info_of(id)?))
    }

    async fn update_incident(
        &self,
        req: Request<pb::UpdateIncidentRequest>,
    ) -> Result<Response<pb::IncidentInfo>, Status> {
        let origin = authorize(&self.ctx, &req, "UpdateIncident", Permission::Act)?;
        let r = req.into_inner();
        let id = parse_id(&r.id).map_err(Status::invalid_argument)?;
        let cmd = match (r.resolve, r.level.is_empty(), r.note.is_empty()) {
            (true, true, _) => IncidentCommand::Resolve {
                id,
                summary: r.note,
            },
            (false, false, true) => IncidentCommand::SetLevel {
                id,
                level: level(&r.level)?,
            },
            (false, true, false) => IncidentCommand::Note { id, text: r.note },
            _ => {
                return Err(Status::invalid_argument(
                    "give exactly one of: a note, a new level, or resolve (with an optional summary)",
                ));
            }
        };
        let what = cmd.name();
        self.commit(&origin.to_string(), cmd)
            .await
            .map_err(Status::from)?;
        info!(identity = %origin, incident = %id_text(id), what, "incident updated");
        Ok(Response::new(self.info_of(id)?))
    }

    async fn list_incidents(
        &self,
        req: Request<pb::ListIncidentsRequest>,
    ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
        authorize(&self.ctx, &req, "ListIncidents", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let r = req.get_ref();
        let limit = match r.limit {
            0 => 50,
            n => n as usize,
        };
        let incidents = self.ctx.node.read(|s| {
            s.incidents
                .incidents
                .values()
                .rev()
                .filter(|i| !r.open_only || i.is_open())
                .take(limit)
                .map(|i| info(s, i))
                .collect()
        });
        Ok(fresh.respond(pb::ListIncidentsResponse { incidents }))
    }

    async fn get_incident(
        &self,
        req: Request<pb::GetIncidentRequest>,
    ) -> Result<Response<pb::IncidentInfo>, Status> {
        authorize(&self.ctx, &req, "GetIncident", Permission::Read)?;
        let fresh = super::read_guard(&self.ctx, &req).await?;
        let id = parse_id(&req.get_ref().id).map_err(Status::invalid_argument)?;
        Ok(fresh.respond(self.info_of(id)?))
    }
}
