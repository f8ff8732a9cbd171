-- Argo CD health of a tenancy.dev Tenant, from its status phase and conditions.
-- Healthy: Active and Ready. Suspended: spec.state Suspended, converged.
-- Progressing: not yet seen, being provisioned, being deleted, a spec change
-- not yet observed, a migration rolling out. Degraded: Failed, or Ready /
-- another condition False for a reason a person must act on.
local hs = {status = "Progressing", message = "Waiting for the operator to report status"}
local function cond(status, ctype)
  if status == nil or status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then return c end
  end
  return nil
end
local function text(c)
  local m = c.reason or ""
  if c.message ~= nil and c.message ~= "" then m = m .. ": " .. c.message end
  return c.type .. " " .. m
end
-- Condition reasons that mean "on its way", not "broken".
local waiting = {RollingOut = true, MigrationSetNotFound = true, Pending = true, Progressing = true, Provisioning = true}

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  local blocked = cond(obj.status, "DeletionBlocked")
  if blocked ~= nil and blocked.status == "True" then
    hs.status = "Degraded"
    hs.message = text(blocked)
  else
    hs.message = "Being deleted"
  end
  return hs
end
local st = obj.status
if st == nil or st.phase == nil then return hs end
if st.observedGeneration ~= nil and obj.metadata.generation ~= nil and st.observedGeneration < obj.metadata.generation then
  hs.message = "The operator has not yet observed generation " .. obj.metadata.generation
  return hs
end
local ready = cond(st, "Ready")
if st.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = ready ~= nil and text(ready) or "Failed"
  return hs
end
if st.phase == "Pending" or st.phase == "Provisioning" then
  hs.message = ready ~= nil and text(ready) or st.phase
  return hs
end
if st.phase == "Deleting" then
  hs.message = "Being deleted"
  return hs
end
if ready == nil or ready.status ~= "True" then
  if ready ~= nil and waiting[ready.reason or ""] then
    hs.message = text(ready)
  else
    hs.status = "Degraded"
    hs.message = ready ~= nil and text(ready) or "No Ready condition"
  end
  return hs
end
-- Ready: any other condition that is False says what is missing.
for _, c in ipairs(st.conditions or {}) do
  if c.type ~= "Ready" and c.type ~= "DeletionBlocked" and c.status == "False" then
    if waiting[c.reason or ""] then
      if c.reason ~= "MigrationSetNotFound" then
        hs.message = text(c)
        return hs
      end
    else
      hs.status = "Degraded"
      hs.message = text(c)
      return hs
    end
  end
end
if st.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = text(ready)
  return hs
end
hs.status = "Healthy"
hs.message = text(ready)
return hs
