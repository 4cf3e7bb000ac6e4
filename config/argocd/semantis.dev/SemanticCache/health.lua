-- ArgoCD health check for semantis.dev/SemanticCache. Reads observedGeneration and the
-- operator's conditions: Suspended when paused, Progressing until the current generation is
-- reconciled and ready (or while an index migration runs), Degraded when the operator says so.
local hs = {}

local function paused(o)
  if o.spec ~= nil and o.spec.paused == true then
    return true
  end
  return o.metadata ~= nil and o.metadata.annotations ~= nil
    and o.metadata.annotations["semantis.dev/paused"] == "true"
end

if paused(obj) then
  hs.status = "Suspended"
  hs.message = "Reconciliation is paused"
  return hs
end

local generation = obj.metadata.generation or 0
if obj.status == nil or obj.status.observedGeneration == nil
  or obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation
  return hs
end

local conditions = {}
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    conditions[c.type] = c
  end
end

local function current(c)
  return c ~= nil and (c.observedGeneration == nil or c.observedGeneration >= generation)
end

local degraded = conditions["Degraded"]
if current(degraded) and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = (degraded.reason or "Degraded") .. ": " .. (degraded.message or "")
  return hs
end

local ready = conditions["Ready"]
if current(ready) and ready.status == "True" then
  local index = conditions["IndexReady"]
  if current(index) and index.status == "False" and index.reason == "Reindexing" then
    hs.status = "Progressing"
    hs.message = index.message or "Rebuilding the index"
    return hs
  end
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end

hs.status = "Progressing"
if ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
else
  hs.message = "Waiting for the cache to become ready"
end
return hs
