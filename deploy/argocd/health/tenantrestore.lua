-- Argo CD health of a tenancy.dev TenantRestore (a one-off restore of one
-- tenant from one of its backups), from its status phase:
-- Pending or Running: Progressing; Succeeded: Healthy; Failed: Degraded.
local hs = {status = "Progressing", message = "Waiting for the operator to start the restore"}
local st = obj.status
if st == nil or st.phase == nil then return hs end
local msg = st.message
if msg == nil then
  for _, c in ipairs(st.conditions or {}) do
    if c.type == "Ready" or c.type == "Complete" or c.type == "Failed" then msg = c.message end
  end
end
if st.phase == "Succeeded" then
  hs.status = "Healthy"
elseif st.phase == "Failed" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = (msg ~= nil and msg ~= "") and (st.phase .. ": " .. msg) or st.phase
return hs
