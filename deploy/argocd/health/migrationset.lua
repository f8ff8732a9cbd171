-- Argo CD health of a tenancy.dev MigrationSet, from its status phase.
-- Healthy: Complete (every following tenant at the latest version).
-- Progressing: no status yet, a new generation not yet observed, or a
-- rollout under way. Degraded: Paused (a failed migration, a checksum
-- mismatch or an invalid spec stopped the rollout).
local hs = {status = "Progressing", message = "Waiting for the operator to report status"}
local st = obj.status
if st == nil or st.phase == nil then return hs end
if st.observedGeneration ~= nil and obj.metadata ~= nil and obj.metadata.generation ~= nil and st.observedGeneration < obj.metadata.generation then
  hs.message = "The operator has not yet observed generation " .. obj.metadata.generation
  return hs
end
local msg = ""
for _, c in ipairs(st.conditions or {}) do
  if (st.phase == "Paused" and c.type == "Paused") or (st.phase ~= "Paused" and c.type == "Ready") then
    msg = (c.reason or "") .. ": " .. (c.message or "")
  end
end
if st.phase == "Complete" then
  hs.status = "Healthy"
elseif st.phase == "Paused" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = msg ~= "" and msg or st.phase
return hs
