{{/*
Helpers of the forwarder chart. Every name is namespaced "forwarder." so that a parent chart
can include this one without clashes.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "forwarder.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified name of the release's objects (63 characters at most: DNS label rules).
A release name that already contains the chart name is used as is.
*/}}
{{- define "forwarder.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "forwarder.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. They end up in the Deployment's immutable spec.selector, so they must never
change for the life of a release: only the name and the instance, never a version, a chart
version or anything from values other than nameOverride.
*/}}
{{- define "forwarder.selectorLabels" -}}
app.kubernetes.io/name: {{ include "forwarder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object: the selector labels plus descriptive ones that may change. */}}
{{- define "forwarder.labels" -}}
helm.sh/chart: {{ include "forwarder.chart" . }}
{{ include "forwarder.selectorLabels" . }}
app.kubernetes.io/version: {{ include "forwarder.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: datagrid-forwarder
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the `helm test` pod: deliberately not a superset of the selector labels, so that the
Service, the PodDisruptionBudget and the spread constraints never count it.
*/}}
{{- define "forwarder.testLabels" -}}
helm.sh/chart: {{ include "forwarder.chart" . }}
app.kubernetes.io/name: {{ include "forwarder.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "forwarder.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "forwarder.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image tag: image.tag, else the chart's appVersion. */}}
{{- define "forwarder.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The image reference; a digest, when given, pins it. */}}
{{- define "forwarder.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (include "forwarder.imageTag" .) }}
{{- if .Values.image.digest }}
{{- $ref = printf "%s@%s" $ref .Values.image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{/* The Secret holding the credentials: secrets.existingSecret, or the one this chart creates. */}}
{{- define "forwarder.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "forwarder.fullname" .) }}
{{- end }}

{{/*
A setting's value from .Values.config, rendered for an environment variable. Helm reads every
YAML number as a float, so 1048576 would print as "1.048576e+06": whole numbers are printed as
integers instead.
Usage: include "forwarder.envValue" $value
*/}}
{{- define "forwarder.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* FORWARDER_HTTP_PORT: the container port the probes, the Service and the ServiceMonitor use. */}}
{{- define "forwarder.httpPort" -}}
{{- include "forwarder.envValue" (required "config.FORWARDER_HTTP_PORT is required" .Values.config.FORWARDER_HTTP_PORT) }}
{{- end }}

{{/* The management port (probes, scrapes); 0 when the routes stay on the HTTP port. */}}
{{- define "forwarder.managementPort" -}}
{{- include "forwarder.envValue" (.Values.config.FORWARDER_MANAGEMENT_PORT | default 0) }}
{{- end }}

{{/* The container port name that probes and scrapes use. */}}
{{- define "forwarder.probePort" -}}
{{- if gt (include "forwarder.managementPort" . | int) 0 }}management{{ else }}http{{ end }}
{{- end }}

{{/*
The consumer group: the configured one, or one of this release's own, so that two releases on
one cluster never split each other's jobs (the transactional ids derive from it too).
*/}}
{{- define "forwarder.consumerGroup" -}}
{{- .Values.config.FORWARDER_CONSUMER_GROUP | default (printf "%s.%s" .Release.Namespace (include "forwarder.fullname" .)) }}
{{- end }}

{{/* The Kafka security protocol the pods use (the app's default is PLAINTEXT). */}}
{{- define "forwarder.kafkaSecurityProtocol" -}}
{{- .Values.config.FORWARDER_KAFKA_SECURITY_PROTOCOL | default "PLAINTEXT" }}
{{- end }}

{{/*
"true" when the pods log in to Kafka with a SASL user name and password (PLAIN, SCRAM): they then
need FORWARDER_KAFKA_SASL_PASSWORD. The token mechanisms (OAUTHBEARER, AWS_MSK_IAM) are
forwarder.kafkaSaslToken's.
*/}}
{{- define "forwarder.kafkaSasl" -}}
{{- if and (hasPrefix "SASL" (include "forwarder.kafkaSecurityProtocol" .)) (not (include "forwarder.kafkaSaslToken" .)) }}true{{ end }}
{{- end }}

{{/* The token mechanism (OAUTHBEARER or AWS_MSK_IAM) when the pods log in with one. */}}
{{- define "forwarder.kafkaSaslToken" -}}
{{- $mechanism := toString (.Values.config.FORWARDER_KAFKA_SASL_MECHANISM | default "") }}
{{- if and (hasPrefix "SASL" (include "forwarder.kafkaSecurityProtocol" .)) (has $mechanism (list "OAUTHBEARER" "AWS_MSK_IAM")) }}{{ $mechanism }}{{ end }}
{{- end }}

{{/* "true" when the pods talk TLS to Kafka. */}}
{{- define "forwarder.kafkaTls" -}}
{{- if has (include "forwarder.kafkaSecurityProtocol" .) (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: long enough for the preStop pause plus the app's drain
(FORWARDER_DRAIN_TIMEOUT_SECONDS) plus closing the Kafka clients. Computed unless set; a value
that does not exceed pause + drain is refused, since Kubernetes would SIGKILL the pod mid-drain.
*/}}
{{- define "forwarder.terminationGracePeriodSeconds" -}}
{{- $drain := required "config.FORWARDER_DRAIN_TIMEOUT_SECONDS is required" .Values.config.FORWARDER_DRAIN_TIMEOUT_SECONDS | float64 | ceil | int64 }}
{{- $pause := .Values.lifecycle.preStopSleepSeconds | int64 }}
{{- $needed := add $drain $pause }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed .Values.lifecycle.shutdownMarginSeconds }}
{{- else if le (int64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + config.FORWARDER_DRAIN_TIMEOUT_SECONDS (%d): leave it empty to have it computed" (int64 .Values.terminationGracePeriodSeconds) $needed) }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Checks that values.schema.json cannot express (or cannot explain well). Included by the
Deployment, so every render runs them.
*/}}
{{- define "forwarder.validate" -}}
{{- range $key := list "DATAGRID_API_KEY" "FORWARDER_DATAGRID_API_KEY" "FORWARDER_WEBHOOK_SECRETS" "FORWARDER_API_TOKENS" "FORWARDER_KAFKA_SASL_PASSWORD" "FORWARDER_KAFKA_OAUTH_CLIENT_SECRET" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s: secrets do not belong in the ConfigMap; use the secrets.* values or secrets.existingSecret" $key) }}
{{- end }}
{{- end }}
{{- if .Values.kafkaTls.ca.secretName }}{{ if .Values.kafkaTls.ca.configMapName }}
{{- fail "kafkaTls.ca: set secretName or configMapName, not both" }}
{{- end }}{{ end }}
{{- if or .Values.kafkaTls.ca.secretName .Values.kafkaTls.ca.configMapName }}
{{- if hasKey .Values.config "FORWARDER_KAFKA_SSL_CAFILE" }}
{{- fail "config.FORWARDER_KAFKA_SSL_CAFILE: the chart sets it from kafkaTls.ca; remove it from config" }}
{{- end }}
{{- end }}
{{- if .Values.kafkaTls.clientCertSecret }}
{{- range $key := list "FORWARDER_KAFKA_SSL_CERTFILE" "FORWARDER_KAFKA_SSL_KEYFILE" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s: the chart sets it from kafkaTls.clientCertSecret; remove it from config" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (include "forwarder.hasCredential" (list $ "DATAGRID_API_KEY")) }}
{{- fail "secrets.datagridApiKey (DATAGRID_API_KEY) is required, or name a Secret holding it in secrets.existingSecret or secrets.refs.DATAGRID_API_KEY" }}
{{- end }}
{{- if not (include "forwarder.hasCredential" (list $ "FORWARDER_WEBHOOK_SECRETS")) }}
{{- fail "secrets.webhookSecrets (FORWARDER_WEBHOOK_SECRETS) is required, or name a Secret holding it in secrets.existingSecret or secrets.refs.FORWARDER_WEBHOOK_SECRETS" }}
{{- end }}
{{- if and (include "forwarder.kafkaSasl" .) (not (include "forwarder.hasCredential" (list $ "FORWARDER_KAFKA_SASL_PASSWORD"))) }}
{{- fail "config.FORWARDER_KAFKA_SECURITY_PROTOCOL is SASL_*: secrets.kafkaSaslPassword (FORWARDER_KAFKA_SASL_PASSWORD) is required, or name its Secret in secrets.refs.FORWARDER_KAFKA_SASL_PASSWORD or secrets.existingSecret" }}
{{- end }}
{{- range $variable, $value := include "forwarder.credentials" . | fromYaml }}
{{- if and (hasKey $.Values.secrets.refs $variable) (get $.Values.secrets $value) }}
{{- fail (printf "secrets.%s and secrets.refs.%s both give %s: set one" $value $variable $variable) }}
{{- end }}
{{- end }}
{{- include "forwarder.validateStrimzi" . }}
{{- $token := include "forwarder.kafkaSaslToken" . }}
{{- if eq $token "OAUTHBEARER" }}
{{- range $key := list "FORWARDER_KAFKA_OAUTH_TOKEN_URL" "FORWARDER_KAFKA_OAUTH_CLIENT_ID" }}
{{- if not (index $.Values.config $key) }}
{{- fail (printf "config.FORWARDER_KAFKA_SASL_MECHANISM is OAUTHBEARER: config.%s is required" $key) }}
{{- end }}
{{- end }}
{{- if not (include "forwarder.hasCredential" (list $ "FORWARDER_KAFKA_OAUTH_CLIENT_SECRET")) }}
{{- fail "config.FORWARDER_KAFKA_SASL_MECHANISM is OAUTHBEARER: secrets.kafkaOauthClientSecret (FORWARDER_KAFKA_OAUTH_CLIENT_SECRET) is required, or name its Secret in secrets.refs.FORWARDER_KAFKA_OAUTH_CLIENT_SECRET or secrets.existingSecret" }}
{{- end }}
{{- end }}
{{- if and (eq $token "AWS_MSK_IAM") (not .Values.config.AWS_REGION) }}
{{- fail "config.FORWARDER_KAFKA_SASL_MECHANISM is AWS_MSK_IAM: config.AWS_REGION is required (the pod's AWS credentials come from its ServiceAccount's role: serviceAccount.annotations)" }}
{{- end }}
{{- if and $token .Values.keda.enabled }}
{{- fail (printf "keda.enabled: the chart's KEDA trigger logs in with a SASL user name and password or TLS only, not %s; scale on CPU (autoscaling) or write the ScaledObject yourself" $token) }}
{{- end }}
{{- if include "forwarder.kafkaSasl" . }}
{{- range $key := list "FORWARDER_KAFKA_SASL_MECHANISM" "FORWARDER_KAFKA_SASL_USERNAME" }}
{{- if not (index $.Values.config $key) }}
{{- fail (printf "config.FORWARDER_KAFKA_SECURITY_PROTOCOL is SASL_*: config.%s is required" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage)) }}
{{- fail "autoscaling.enabled: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- if and .Values.secrets.existingSecretKeys (not .Values.secrets.existingSecret) }}
{{- fail "secrets.existingSecretKeys: remaps the keys of secrets.existingSecret, which is not set" }}
{{- end }}
{{- if hasKey .Values.config "FORWARDER_KAFKA_GROUP_INSTANCE_ID" }}
{{- fail "config.FORWARDER_KAFKA_GROUP_INSTANCE_ID: every pod needs its own; set kafka.staticMembership=true (each pod uses its name)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled both scale the Deployment: enable one" }}
{{- end }}
{{- end }}

{{/*
The `job` label of this install's scraped series, which its alert rules select: prometheusRule.job,
else what the chart's ServiceMonitor gives (the Service's name, or the value of the Service label
named by serviceMonitor.jobLabel).
*/}}
{{- define "forwarder.ruleJob" -}}
{{- if .Values.prometheusRule.job }}
{{- .Values.prometheusRule.job }}
{{- else if .Values.serviceMonitor.jobLabel }}
{{- $labels := include "forwarder.labels" . | fromYaml }}
{{- $value := get $labels .Values.serviceMonitor.jobLabel }}
{{- if not $value }}
{{- fail (printf "serviceMonitor.jobLabel: the Service has no label %q (it has %s); set prometheusRule.job" .Values.serviceMonitor.jobLabel (keys $labels | sortAlpha | join ", ")) }}
{{- end }}
{{- $value }}
{{- else }}
{{- include "forwarder.fullname" . }}
{{- end }}
{{- end }}

{{/*
The credentials the chart knows by name, with the secrets.* value that can hold each inline.
*/}}
{{- define "forwarder.credentials" -}}
DATAGRID_API_KEY: datagridApiKey
FORWARDER_WEBHOOK_SECRETS: webhookSecrets
FORWARDER_API_TOKENS: apiTokens
FORWARDER_KAFKA_SASL_PASSWORD: kafkaSaslPassword
FORWARDER_KAFKA_OAUTH_CLIENT_SECRET: kafkaOauthClientSecret
{{- end }}

{{/*
Where a credential comes from, as the `name:` and `key:` lines of a secretKeyRef: its own
secrets.refs.<VARIABLE> when given (a Strimzi KafkaUser Secret, say), else the chart's Secret or
secrets.existingSecret.
Usage: include "forwarder.secretKeyRef" (list $ "DATAGRID_API_KEY")
*/}}
{{- define "forwarder.secretKeyRef" -}}
{{- $root := index . 0 }}
{{- $variable := index . 1 }}
{{- with get $root.Values.secrets.refs $variable }}
name: {{ .name }}
key: {{ .key }}
{{- else }}
name: {{ include "forwarder.secretName" $root }}
key: {{ include "forwarder.secretKey" (list $root $variable) }}
{{- end }}
{{- end }}

{{/*
"true" when a credential is given somewhere: its own ref, secrets.existingSecret, or inline.
Usage: include "forwarder.hasCredential" (list $ "DATAGRID_API_KEY")
*/}}
{{- define "forwarder.hasCredential" -}}
{{- $root := index . 0 }}
{{- $variable := index . 1 }}
{{- $inline := get (include "forwarder.credentials" $root | fromYaml) $variable }}
{{- if or (hasKey $root.Values.secrets.refs $variable) $root.Values.secrets.existingSecret (get $root.Values.secrets $inline) }}true{{ end }}
{{- end }}

{{/*
Kafka's retention.ms for a number of hours from config (-1 stays -1: kept for ever).
Usage: include "forwarder.retentionMs" 720
*/}}
{{- define "forwarder.retentionMs" -}}
{{- if eq (float64 .) -1.0 }}-1{{ else }}{{ mulf (float64 .) 3600000 | int64 }}{{ end }}
{{- end }}

{{/* The KafkaUser's name (also its SASL user name and the Secret Strimzi makes for it). */}}
{{- define "forwarder.strimziUser" -}}
{{- .Values.strimzi.user.name | default (include "forwarder.fullname" .) }}
{{- end }}

{{/* strimzi.* checks (included by forwarder.validate). */}}
{{- define "forwarder.validateStrimzi" -}}
{{- if .Values.strimzi.enabled }}
{{- if not .Values.strimzi.cluster }}
{{- fail "strimzi.enabled: strimzi.cluster (the Kafka cluster's name, label strimzi.io/cluster) is required" }}
{{- end }}
{{- if eq (toString (get .Values.config "FORWARDER_KAFKA_CREATE_TOPICS" | default "false")) "true" }}
{{- fail "strimzi.enabled: the KafkaTopic resources make the topics; remove config.FORWARDER_KAFKA_CREATE_TOPICS" }}
{{- end }}
{{- if and (eq .Values.strimzi.user.authentication "scram-sha-512") (include "forwarder.kafkaSasl" .) (ne (toString (get .Values.config "FORWARDER_KAFKA_SASL_USERNAME")) (include "forwarder.strimziUser" .)) }}
{{- fail (printf "strimzi.enabled: config.FORWARDER_KAFKA_SASL_USERNAME must be the KafkaUser's name, %s" (include "forwarder.strimziUser" .)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The Secret key holding a variable: secrets.existingSecretKeys[variable] with an existingSecret,
else the variable's own name (the chart's Secret always uses the names).
Usage: include "forwarder.secretKey" (list $ "DATAGRID_API_KEY")
*/}}
{{- define "forwarder.secretKey" -}}
{{- $root := index . 0 }}
{{- $variable := index . 1 }}
{{- if $root.Values.secrets.existingSecret }}
{{- get $root.Values.secrets.existingSecretKeys $variable | default $variable }}
{{- else }}
{{- $variable }}
{{- end }}
{{- end }}
